"""Public pre-training: train the federation's model on public faces before any school sees it.

Why: under student-level DP a school's few hundred students buy only a few hundred noisy steps; public
FER data (FER2013, RAF-DB, AffectNet, or the synthetic classroom's public *training* split) costs no
privacy, so the strongest DP recipes start from a model trained on it and fine-tune privately (De et
al. 2022). This module does the non-private part, once, and writes a checkpoint with its provenance:

    {"format": "fedfer-pretrained/1", "state_dict": {...}, "model": {name, preset, num_classes},
     "provenance": {data (spec, split, n, fingerprint), epochs, batch_size, lr, seed, config,
                    inputs_hash, weights_sha256, final_loss, steps, seconds, evaluation}}

`model.pretrained=PATH` loads it (shared_models/models/pretrained.py reads the "state_dict" entry);
`model.pretrain=auto` calls :func:`ensure_pretrained`, which caches the checkpoint under a hash of
everything that determines it (model, pre-training settings, the data's fingerprint), like the
synthetic classroom's cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from shared_models.atomic_files import atomic_write_bytes, locked
from shared_models.datasets import BenchmarkError, open_benchmark, split_benchmark_list
from shared_models.labels import FER7
from shared_models.models import registry

FORMAT = "fedfer-pretrained/1"
PROGRESS_EVERY_S = 60.0   # a progress line within a pre-training epoch at most this often
VERSION = "1"   # bump when the training loop changes what a given set of inputs produces
CONFIG_KEYS = ("model.name", "model.preset", "model.aux_loss_weight", "pretrain.benchmarks", "pretrain.epochs",
               "pretrain.batch_size", "pretrain.lr", "pretrain.seed")
_LABEL_FILES = (".csv", ".txt", ".json", ".tsv")

Echo = Callable[[str], None]


class PretrainError(ValueError):
    """Pre-training cannot start (bad spec, wrong label set, no data); one line naming the benchmark."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: Path) -> str:
    """What identifies a benchmark's data without reading every image: a file's bytes, or a folder's
    listing (relative path and size of every file) plus the bytes of its label lists."""
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\n".encode())
        if file.suffix.lower() in _LABEL_FILES and size < (64 << 20):
            digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


def _open(spec: str, data_root: Path | None) -> Any:
    try:
        bench = open_benchmark(spec, data_root=data_root)
    except BenchmarkError as exc:
        raise PretrainError(f"pretrain.benchmarks: {exc}") from None
    labels = tuple(bench.labels)
    if labels != tuple(FER7[:len(labels)]):
        raise PretrainError(f"pretrain.benchmarks: {spec}: labels {', '.join(labels)} are not the FER7 classes "
                            f"({', '.join(FER7)}) the model predicts")
    if len(bench) == 0:
        raise PretrainError(f"pretrain.benchmarks: {spec}: no samples in split '{bench.split}'")
    return bench


def check_model_reads_stills(cfg: Mapping[str, Any]) -> None:
    """Pre-training trains on still faces: a clip model (mafnet, r2plus1d_sta) is refused in one line rather
    than failing inside its first forward pass."""
    if registry.config_clip_frames(cfg):
        raise PretrainError(f"model.name: {cfg['model.name']} ({cfg['model.preset']}) reads clips and pre-training "
                            "trains on still faces: start it from scratch (model.pretrain=) or from a checkpoint of "
                            "your own (model.pretrained=PATH)")


def data_specs(cfg: Mapping[str, Any], data_root: Path | None) -> list[dict[str, Any]]:
    """The pre-training data as provenance: spec, reader split, sample count, path and fingerprint."""
    check_model_reads_stills(cfg)
    specs = split_benchmark_list(str(cfg["pretrain.benchmarks"]))
    if not specs:
        raise PretrainError("pretrain.benchmarks: no benchmark given (e.g. synthetic-fer2013:train or fer2013:train=PATH)")
    out = []
    for spec in specs:
        bench = _open(spec, data_root)
        out.append({"spec": spec, "name": bench.name, "split": bench.split, "n": len(bench),
                    "path": str(bench.path), "fingerprint": fingerprint(Path(bench.path))})
    return out


def inputs_hash(cfg: Mapping[str, Any], data: list[dict[str, Any]]) -> str:
    """Hash of everything that determines the pre-trained weights (names the cached checkpoint)."""
    inputs = {"version": VERSION, "config": {k: cfg[k] for k in CONFIG_KEYS},
              "data": [{k: d[k] for k in ("name", "split", "n", "fingerprint")} for d in data]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def default_path(key: str) -> Path:
    """~/.cache/fedfer/pretrained/<inputs hash>.pt ($XDG_CACHE_HOME is honoured)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "fedfer" / "pretrained" / f"{key}.pt"


def _faces(benches: list[Any], input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every face resized once to (N, 3, S, S) uint8 (a quarter of float32's memory) and its label."""
    from torchvision.transforms import v2

    from shared_models.transforms import to_tensor_image

    resize = v2.Resize((input_size, input_size), antialias=True)
    images, labels = [], []
    for bench in benches:
        for i in range(len(bench)):
            face = bench.source.load(i)
            if face is None:
                continue
            images.append(resize(to_tensor_image(np.asarray(face))))
            labels.append(int(bench.targets[i]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _normalise(batch: torch.Tensor) -> torch.Tensor:
    from shared_models.transforms import MEAN, STD

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (batch.float() / 255.0 - mean) / std


def train_public(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int,
                 lr: float, seed: int, echo: Echo | None = None,
                 after_epoch: Callable[[int, nn.Module], None] | None = None,
                 progress_every_s: float = PROGRESS_EVERY_S) -> dict[str, float]:
    """Plain Adam on public faces, every parameter trainable, random horizontal flips (label-preserving
    for facial expressions). Returns steps, final epoch's mean loss and seconds. `after_epoch(epoch,
    model)` is called after every epoch (1-based) in eval mode, e.g. to score a learning curve. `echo` gets
    a line per epoch and, within a long one, one every `progress_every_s` seconds."""
    registry.freeze_for_finetuning(model, "all")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps, loss_sum, count = 0, 0.0, 0
    started = time.perf_counter()
    said = started
    per_epoch = -(-len(labels) // batch_size)
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        loss_sum, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = _normalise(images[idx])
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            y = labels[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = registry.per_sample_loss(model, model(x), y).mean()
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
            if echo is not None and time.perf_counter() - said >= progress_every_s and count < len(order):
                said = time.perf_counter()   # a paper preset's epoch takes minutes on one thread: show it moves
                echo(f"pre-training epoch {epoch + 1}/{epochs}: step {steps - epoch * per_epoch}/{per_epoch}, "
                     f"loss {loss_sum / count:.3f}, {said - started:.0f} s")
        if echo is not None:
            echo(f"pre-training epoch {epoch + 1}/{epochs}: loss {loss_sum / max(count, 1):.3f}")
        if after_epoch is not None:
            model.eval()
            after_epoch(epoch + 1, model)
            model.train()
    model.eval()
    return {"steps": steps, "final_loss": loss_sum / max(count, 1), "seconds": time.perf_counter() - started}


def _train_with_threads(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: Mapping[str, Any],
                        seed: int, echo: Echo | None) -> dict[str, float]:
    """train_public with `pretrain.threads` torch threads (0 = the cores free now), then the caller's count
    back: `fedfer simulate` pre-trains in its own process before it starts the federation."""
    from shared_models.threads import apply_threads

    before = torch.get_num_threads()
    threads = apply_threads(int(cfg.get("pretrain.threads", 1)))
    try:
        stats = train_public(model, images, labels, epochs=int(cfg["pretrain.epochs"]),
                             batch_size=int(cfg["pretrain.batch_size"]), lr=float(cfg["pretrain.lr"]), seed=seed,
                             echo=echo)
    finally:
        torch.set_num_threads(before)
    return {**stats, "threads": threads}


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pretrain(cfg: Mapping[str, Any], data_root: Path | None, out: Path, *, evaluate: bool = False,
             echo: Echo | None = None, data: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Pre-train the config's model on `pretrain.benchmarks` and write the checkpoint to `out`; returns
    its provenance. `evaluate` also scores it on `evaluation.benchmarks` (recorded in the provenance).
    `data`: the :func:`data_specs` the caller already read (fingerprinting a folder takes seconds)."""
    data = data if data is not None else data_specs(cfg, data_root)
    key = inputs_hash(cfg, data)
    seed = int(cfg["pretrain.seed"])
    torch.manual_seed(seed)
    model = registry.build_from_config(cfg)
    benches = [_open(d["spec"], data_root) for d in data]
    images, labels = _faces(benches, int(model.input_size))
    if echo is not None:
        echo(f"pre-training {cfg['model.name']} ({cfg['model.preset']}) on {len(labels)} public faces: "
             + ", ".join(f"{d['spec']} ({d['n']})" for d in data))
    stats = _train_with_threads(model, images, labels, cfg, seed, echo)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    provenance: dict[str, Any] = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "privacy": "public data only: no school data, no privacy cost",
        "data": data, "images": int(len(labels)), "epochs": int(cfg["pretrain.epochs"]),
        "batch_size": int(cfg["pretrain.batch_size"]), "lr": float(cfg["pretrain.lr"]), "optimizer": "adam",
        "augment": "horizontal flip", "seed": seed, "config": {k: cfg[k] for k in CONFIG_KEYS},
        "inputs_hash": key, "weights_sha256": weights_sha256(state),
        "steps": int(stats["steps"]), "final_loss": float(stats["final_loss"]), "seconds": round(stats["seconds"], 2),
        "threads": int(stats["threads"]),
    }
    if evaluate:
        provenance["evaluation"] = _scores(model, cfg, data_root)
    _write(Path(out), {"format": FORMAT, "state_dict": state, "model": registry.model_info(cfg),
                       "provenance": provenance})
    return provenance


def _scores(model: nn.Module, cfg: Mapping[str, Any], data_root: Path | None) -> dict[str, dict[str, Any]]:
    """The provenance's `evaluation`: accuracy, its CI and n on each of `evaluation.benchmarks`."""
    from shared_models.evaluation import evaluate_benchmarks

    results = evaluate_benchmarks(model, str(cfg["evaluation.benchmarks"]), data_root, cfg)
    return {name: {k: m[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "n") if k in m}
            for name, m in results.items()}


def _write(out: Path, checkpoint: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(out, buffer.getvalue())


def reuse_cached(cfg: Mapping[str, Any], data_root: Path | None, out: Path, *, evaluate: bool = False,
                 data: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The checkpoint already pre-trained from exactly these inputs (the cache `model.pretrain=auto` fills),
    copied to `out`: its provenance, scored now if `evaluate` and it was not. None when there is none to
    reuse: not cached, unreadable, or its recorded inputs or weights are not what its name says.
    Why: `fedfer pretrain --out` on the defaults' public data retrained for minutes a checkpoint the demo had
    already cached under the same inputs hash."""
    data = data if data is not None else data_specs(cfg, data_root)
    key = inputs_hash(cfg, data)
    cached = default_path(key)
    if not cached.is_file():
        return None
    try:
        checkpoint = torch.load(cached, map_location="cpu", weights_only=True)
        provenance = dict(checkpoint["provenance"])
        state = checkpoint["state_dict"]
        intact = provenance.get("inputs_hash") == key and weights_sha256(state) == provenance.get("weights_sha256")
    except Exception:   # a damaged cache entry is trained again, as if absent
        return None
    if not intact:
        return None
    if evaluate and "evaluation" not in provenance:   # the cache is filled without scoring it
        model = registry.build_from_config(cfg)
        model.load_state_dict(state)
        provenance["evaluation"] = _scores(model, cfg, data_root)
    if Path(out).expanduser().resolve() != cached.resolve():
        _write(Path(out), {**checkpoint, "provenance": provenance})
    return provenance


def cached_checkpoint(cfg: Mapping[str, Any], data_root: Path | None,
                      data: list[dict[str, Any]] | None = None) -> Path:
    """Where :func:`ensure_pretrained` keeps this config's checkpoint (it may not exist yet); `data`: the
    :func:`data_specs` already read."""
    return default_path(inputs_hash(cfg, data if data is not None else data_specs(cfg, data_root)))


def ensure_pretrained(cfg: Mapping[str, Any], data_root: Path | None, echo: Echo | None = None,
                      data: list[dict[str, Any]] | None = None, echo_path: bool = True) -> Path:
    """The cached checkpoint for this config's pre-training (trained now if absent); its path. `data`: the
    :func:`data_specs` the caller already read (fingerprinting a folder takes seconds). `echo` gets the
    training's progress and, with `echo_path`, a last line naming the checkpoint (`fedfer simulate` names it
    in a line of its own)."""
    data = data if data is not None else data_specs(cfg, data_root)
    path = cached_checkpoint(cfg, data_root, data)
    with locked(path):   # two simulations starting at once train it once
        if path.is_file():
            if echo is not None and echo_path:
                echo(f"pre-trained model (cached): {path}")
            return path
        pretrain(cfg, data_root, path, echo=echo, data=data)
    if echo is not None and echo_path:
        echo(f"pre-trained model: {path}")
    return path
