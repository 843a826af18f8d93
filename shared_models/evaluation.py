"""Score a model on a dataset: the one code path behind the federation's evaluation node, the
server's in-process evaluation and ``fedfer evaluate``.

Model outputs: a NamedTuple with ``.logits`` (``FEROutput(logits, aux)``), a plain logits tensor,
or a tuple/list whose first item is the logits.

Label sets of different sizes: every benchmark reader uses the canonical order
(:mod:`shared_models.labels`: FER7 is FER8 without its last class, contempt), so the benchmark's
classes are the first ``k`` of the model's. With a model of ``C > k`` outputs the argmax is taken
over the first ``k`` logits only — an FER8 model scored on a 7-class benchmark cannot lose points
by predicting contempt, exactly as if it had been trained on 7 classes. With ``C < k`` (an FER7
model on FERPlus or CK+) the model can never predict the missing classes: their samples count
as errors and the dict carries ``model_classes`` so readers can see why.

Clips: a batch (B, T, 3, S, S) goes to a clip model (``registry.clip_frames(model) > 0``) as (B, 3, T', S, S)
with its T' frames evenly spaced; to a model declaring ``temporal = True`` whole; otherwise each frame is
scored on its own and the clip's logits are the mean over its frames. WAR (= accuracy) and UAR (mean
per-class recall) are in every report, as seed 003 reports clips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_models.datasets import open_benchmark, split_benchmark_list
from shared_models.datasets.base import collate_skipping
from shared_models.metrics import classification_report


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output (NamedTuple ``.logits``, tensor, or first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"model returned {type(output).__name__}; expected logits or an output with .logits")


def clip_input(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """A reader's clip batch (B, T', 3, S, S) as a clip model's input (B, 3, T, S, S): T =
    `registry.clip_frames(model)` frames evenly spaced over the T' read (repeated when T' < T)."""
    from shared_models.datasets.frames import sample_indices
    from shared_models.models.registry import clip_frames

    wanted = clip_frames(model)
    picks = torch.as_tensor(sample_indices(clips.shape[1], wanted), dtype=torch.long)
    return clips.index_select(1, picks).permute(0, 2, 1, 3, 4).contiguous()


def _forward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    from shared_models.models.registry import clip_frames

    if clip_frames(model) > 0:
        if inputs.ndim != 5:
            raise ValueError(f"{type(model).__name__} reads clips; this benchmark yields images {tuple(inputs.shape)} "
                             "(score it on a clip benchmark: dfew, afew, clipfolder, daisee, synthetic-clips)")
        return logits_of(model(clip_input(model, inputs)))
    if inputs.ndim == 5 and not getattr(model, "temporal", False):
        batch, frames = inputs.shape[:2]
        logits = logits_of(model(inputs.flatten(0, 1)))
        return logits.reshape(batch, frames, -1).mean(dim=1)
    return logits_of(model(inputs))


def predict(model: nn.Module, dataset: Dataset, *, num_classes: int | None = None, batch_size: int = 128,
            device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, int]:
    """(y_true, y_pred, model_classes) over `dataset`, in eval mode under no_grad; samples the
    dataset yields as None (unreadable faces) are left out. The model's train/eval mode is restored."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_skipping)
    was_training = model.training
    model.eval()
    truths: list[np.ndarray] = []
    predictions: list[np.ndarray] = []
    model_classes = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if batch is None:
                    continue
                inputs, targets = batch
                logits = _forward(model, inputs.to(device))
                if logits.ndim != 2:
                    raise ValueError(f"model logits have shape {tuple(logits.shape)}; expected (batch, classes)")
                model_classes = int(logits.shape[1])
                k = num_classes if num_classes is not None else model_classes
                usable = logits[:, : min(k, model_classes)]
                predictions.append(usable.argmax(dim=1).cpu().numpy())
                truths.append(torch.as_tensor(targets).cpu().numpy())
    finally:
        model.train(was_training)
    if not truths:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), model_classes
    return np.concatenate(truths).astype(np.int64), np.concatenate(predictions).astype(np.int64), model_classes


def evaluate_model(model: nn.Module, dataset: Dataset, *, batch_size: int = 128, n_boot: int = 1000, seed: int = 0,
                   num_classes: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Run `model` over `dataset` (e.g. ``benchmark.as_torch(eval_transform(S))``) and return
    :func:`shared_models.metrics.classification_report`'s dict plus ``labels`` (class names, when
    the dataset has them), ``skipped`` (unreadable samples) and ``model_classes`` (output width).

    `num_classes` defaults to ``dataset.num_classes`` and else to the model's output width."""
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
    y_true, y_pred, model_classes = predict(model, dataset, num_classes=num_classes, batch_size=batch_size,
                                            device=device)
    name = getattr(dataset, "name", type(dataset).__name__)
    if y_true.size == 0:
        raise ValueError(f"{name}: nothing to score (no readable samples)")
    k = int(num_classes if num_classes is not None else model_classes)
    report = classification_report(y_true, y_pred, k, n_boot=n_boot, seed=seed)
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        report["labels"] = list(labels)
    report["skipped"] = int(getattr(dataset, "skipped", 0))
    report["model_classes"] = model_classes
    return report

# ---------------------------------------------------------------------------------- benchmark lists
# The evaluation node scores a comma-separated list of benchmark specs. Metrics travel in a Flower
# MetricRecord, which holds flat numbers and lists: `flatten_metrics` turns {benchmark: metric dict}
# into `<benchmark>.<metric>` keys and `unflatten_metrics` turns them back.


def spec_name(spec: str) -> str:
    """`fer2013=/x/y.csv` -> `fer2013`; `synthetic-rafdb` -> `synthetic-rafdb`."""
    return spec.split("=", 1)[0].strip()


class ClipsWithLandmarks(Dataset):
    """A clip benchmark's torch dataset with the landmark row (`mafnet.landmark_rows`) appended to every frame,
    (T, 3, S + 1, S), from a ``landmarks.npy`` beside each clip's frames; a clip without one gets an absent
    row (the model then uses its image stream alone for that clip)."""

    def __init__(self, clips: Dataset, source: Any, size: int) -> None:
        self.clips, self.source, self.size = clips, source, int(size)
        for name in ("name", "labels", "num_classes", "kind", "targets"):
            setattr(self, name, getattr(clips, name, None))

    @property
    def skipped(self) -> int:
        return int(getattr(self.clips, "skipped", 0))

    def __len__(self) -> int:
        return len(self.clips)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        from shared_models.datasets.frames import read_clip_landmarks
        from shared_models.models.mafnet import landmark_rows

        item = self.clips[index]
        if item is None:
            return None
        x, label = item
        found = read_clip_landmarks(Path(self.source.paths[index]), self.source.num_frames)
        marks, width = (torch.from_numpy(found[0]), found[1]) if found and len(found[0]) == x.shape[0] else (None, 1)
        return torch.cat([x, landmark_rows(marks, x.shape[0], self.size, width).to(x.dtype)], dim=2), label


def benchmark_dataset(model: nn.Module, bench: Any, size: int) -> Dataset:
    """A benchmark as `model` reads it at side `size`: resized and normalised; for a clip benchmark and a model
    that reads landmarks (`reads_landmarks`), with the landmark rows of `ClipsWithLandmarks`."""
    from shared_models.models.registry import unwrap
    from shared_models.transforms import eval_transform

    dataset = bench.as_torch(eval_transform(size))
    if bench.kind == "clip" and getattr(unwrap(model), "reads_landmarks", False):
        return ClipsWithLandmarks(dataset, bench.source, size)
    return dataset


def evaluate_benchmarks(model: nn.Module, specs: str, data_root: Path | None, cfg: Mapping[str, Any],
                        cache: dict | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on every benchmark in `specs` (comma-separated); returns {name: metrics}."""
    from shared_models.models.registry import unwrap

    cache = {} if cache is None else cache
    results: dict[str, dict[str, Any]] = {}
    for spec in split_benchmark_list(specs):
        key = (spec, str(data_root), int(model.input_size), bool(getattr(unwrap(model), "reads_landmarks", False)))
        if key not in cache:
            cache[key] = benchmark_dataset(model, open_benchmark(spec, data_root=data_root), int(model.input_size))
        results[spec_name(spec)] = evaluate_model(model, cache[key], n_boot=int(cfg["evaluation.bootstrap"]),
                                                  seed=int(cfg["run.seed"]))
    return results


#: The metrics flatten_metrics sends as lists (the confusion matrix row by row, one recall per class); every other
#: metric is one number. The server accepts a list only under these names, and summaries that want one number per
#: metric leave them out.
LIST_METRICS = ("confusion", "per_class_recall")


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {"num-examples": int(sum(int(m.get("n", 0)) for m in results.values()))}
    for bench, metrics in results.items():
        for name, value in metrics.items():
            if name == "confusion":
                flat[f"{bench}.confusion"] = [int(v) for row in value for v in row]
            elif name == "per_class_recall":
                # a class absent from the benchmark has no recall: NaN on the wire, None again after unflatten
                flat[f"{bench}.per_class_recall"] = [float("nan") if v is None else float(v) for v in value]
            elif isinstance(value, bool):
                continue
            elif isinstance(value, (int, float)):
                flat[f"{bench}.{name}"] = value
            elif value is None:
                flat[f"{bench}.{name}"] = float("nan")
    return flat


def unflatten_metrics(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." not in key:
            continue
        bench, name = key.rsplit(".", 1)
        results.setdefault(bench, {})[name] = list(value) if isinstance(value, (list, tuple)) else value
    for metrics in results.values():
        for name, value in metrics.items():
            if isinstance(value, float) and value != value:
                metrics[name] = None
        if "per_class_recall" in metrics:
            metrics["per_class_recall"] = [None if v != v else v for v in metrics["per_class_recall"]]
        if "confusion" in metrics:
            flat_cm = metrics["confusion"]
            k = int(round(len(flat_cm) ** 0.5))
            metrics["confusion"] = [flat_cm[i * k:(i + 1) * k] for i in range(k)]
    return results
