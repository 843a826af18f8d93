"""What the federation added: the reference models a simulated run is compared with.

After a simulated federation (`fedfer simulate --references`, or `evaluation.references=central,alone`)
this trains, in the same process and from the same start as the federation (the pre-trained checkpoint,
`model.pretrained`):

    (b) ``central``: one model fine-tuned on the pooled schools' training frames, every layer, no
        privacy: the ceiling the federation aims at (what a single data owner could do);
    (c) ``alone``: each picked school fine-tuning on its own data for the run's rounds with the same DP
        as in the federation (the same plan rule, its own policy's declared size, hence the same σ, q
        and steps). Its ε is recomputed by the accountant from the (σ, q, steps) that ran.
    (d) ``noise-free``: the federation itself replayed with the DP noise switched off (not private):
        every school every round, the same plan rule, clipping, q and steps, FedAvgM weighted by the
        declared sizes as server/strategy.py does. Against the federation it is what the privacy
        cost; against (b), what federating itself costs.

and scores them, the start (a), the federation's final model and the model kept as checkpoints/best.pt (what
the schools get; not always the last round) on the public test split and on every school's held-out students
(`synthetic-indomain`, per school too); (d) is scored after each of its rounds, so the report compares it with
the federation at the same round. The result is
``runs/<id>/references.json``; server/report.py draws it beside the federation's rounds ("What the
federation added"). Simulation only: a real school has no one to pool its data with, and the held-out
students exist only in the synthetic classroom.

The schools train one after another in this process; no Flower, ledger or budget guard is involved (the
reference models are never sent anywhere), so their ε is reported, not charged to any school's budget.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from shared_models.wording import counted

FORMAT = "fedfer-references/1"
FILE = "references.json"
PUBLIC, INDOMAIN = "synthetic-fer2013", "synthetic-indomain"
KINDS = ("central", "alone", "noise-free")
#: (d)'s noise multiplier (0 would mean "calibrate to the target ε"): not private
NOISE_FREE_SIGMA = 1e-6
SCORE_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "n")

Echo = Callable[[str], None]


def requested(cfg: Mapping[str, Any]) -> list[str]:
    """The reference kinds `evaluation.references` asks for, in a fixed order."""
    asked = {part.strip() for part in str(cfg.get("evaluation.references", "")).split(",") if part.strip()}
    return [kind for kind in KINDS if kind in asked]


# ---------------------------------------------------------------------------- scoring
class Scorer:
    """Public test and in-domain held-out accuracy (bootstrap 95 % CIs), and in-domain per school."""

    def __init__(self, root: Path, input_size: int, n_boot: int) -> None:
        from shared_models.datasets import open_benchmark
        from shared_models.transforms import eval_transform

        self.n_boot = n_boot
        self.sets = {name: open_benchmark(name, data_root=root) for name in (PUBLIC, INDOMAIN)}
        self.torch = {name: bench.as_torch(eval_transform(input_size)) for name, bench in self.sets.items()}
        held = self.sets[INDOMAIN]
        # held-out faces are named s<school>-ho...: the school they come from
        self.school_of = np.array([int(re.search(r"s(\d+)-ho", held.describe(i)).group(1))   # type: ignore[union-attr]
                                   for i in range(len(held))])

    def _report(self, y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
        from shared_models.metrics import classification_report

        report = classification_report(y, pred, 7, n_boot=self.n_boot, seed=0)
        return {k: report[k] for k in SCORE_KEYS}

    def __call__(self, model: torch.nn.Module, school: int | None = None, per_school: bool = False) -> dict[str, Any]:
        """{PUBLIC: scores, INDOMAIN: scores} (+ "own-school": that school's held-out students, + "per-school")."""
        from shared_models.evaluation import predict

        out: dict[str, Any] = {}
        for name, dataset in self.torch.items():
            y, pred, _ = predict(model, dataset, num_classes=7)
            out[name] = self._report(y, pred)
            if name != INDOMAIN:
                continue
            if school is not None:
                mine = self.school_of == school
                out["own-school"] = self._report(y[mine], pred[mine])
            if per_school:
                out["per-school"] = {int(s): self._report(y[self.school_of == s], pred[self.school_of == s])
                                     for s in sorted(set(self.school_of.tolist()))}
        return out


# ---------------------------------------------------------------------------- training
def model_from(cfg: Mapping[str, Any], start: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The config's model (train.trainable applied) holding the `start` weights."""
    from shared_models.models import registry

    model = registry.build_from_config(cfg)
    model.load_state_dict(start)
    return model


def dp_round(model: torch.nn.Module, school: Any, cfg: Mapping[str, Any], seed: int,
             declared_units: int | None = None, after_noise: Any = None) -> Any:
    """One round of the school's DP-SGD with the ClientApp's plan rule and trainer; returns the DPResult
    (σ, q, steps that ran). `declared_units`: the school's public size (default: its true count);
    `after_noise`: privacy.engine.AfterNoise (experiments: simulations/bench/pretraining.py --subspace)."""
    from privacy.engine import plan_from_config, train_private
    from shared_models.training import FaceDataset, make_optimizer
    from shared_models.transforms import train_transform

    torch.manual_seed(seed)   # draws outside the trainer only: its DP draws and augmentation come from its CSPRNG
    unit = str(cfg["privacy.unit"])
    count = school.num_students if unit == "student" else len(school)
    plan = plan_from_config(cfg, int(declared_units or count))
    frames = FaceDataset(school.images, school.labels, train_transform(model.input_size, bool(cfg["train.augment"])))
    return train_private(model, frames, school.student_ids if unit == "student" else None, plan,
                         make_optimizer(model, cfg, plan.noise_multiplier), int(cfg["train.local_epochs"]), seed=seed,
                         after_noise=after_noise)


def train_alone(cfg: Mapping[str, Any], school: Any, index: int, start: Mapping[str, torch.Tensor],
                declared_units: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(c): the school's `federation.rounds` DP rounds on its own model; the model and its privacy
    (ε recomputed from what ran)."""
    from privacy.accounting import epsilon_of

    model = model_from(cfg, start)
    history, started = [], time.perf_counter()
    for rnd in range(1, int(cfg["federation.rounds"]) + 1):
        result = dp_round(model, school, cfg, seed=int(cfg["run.seed"]) * 100_000 + rnd * 1000 + index,
                          declared_units=declared_units)
        history.append((float(result.noise_multiplier), float(result.sample_rate), int(result.steps)))
    delta = float(cfg["privacy.delta"])
    privacy = {"epsilon": float(epsilon_of(history, delta, kind=str(cfg["privacy.accountant"]))), "delta": delta,
               "accountant": str(cfg["privacy.accountant"]), "rounds": len(history),
               "noise_multiplier": history[-1][0], "sample_rate": history[-1][1], "steps": sum(h[2] for h in history),
               "declared_units": int(declared_units or school.num_students)}
    return model, {"privacy": privacy, "seconds": round(time.perf_counter() - started, 1)}


def train_central(cfg: Mapping[str, Any], schools: list[Any], start: Mapping[str, torch.Tensor], epochs: int,
                  seed: int, after_epoch: Callable[[int, torch.nn.Module], None] | None = None,
                  ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(b): non-private fine-tuning of every layer on the pooled schools (Adam at half the pre-training lr).
    `after_epoch(epoch, model)` sees the model after every epoch (its learning curve)."""
    from torchvision.transforms import v2

    from shared_models.transforms import to_tensor_image
    from simulations.pretrain import train_public

    model = model_from({**cfg, "train.trainable": "all"}, start)
    size = int(model.input_size)
    resize = v2.Resize((size, size), antialias=True)
    images = torch.stack([resize(to_tensor_image(img)) for s in schools for img in s.images])
    labels = torch.from_numpy(np.concatenate([s.labels for s in schools])).long()
    stats = train_public(model, images, labels, epochs=epochs, batch_size=64, lr=float(cfg["pretrain.lr"]) / 2,
                         seed=seed, after_epoch=after_epoch)
    return model, {"epochs": epochs, "frames": int(len(labels)), "seconds": round(stats["seconds"], 1)}


def server_step(global_state: Mapping[str, torch.Tensor], states: list[Mapping[str, torch.Tensor]],
                step: Callable[[str, torch.Tensor], torch.Tensor],
                weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The new global model: old + step(key, average of the schools' models - old) for every float tensor
    (`weights`: the average's, summing to 1; default uniform); integer buffers take the rounded average."""
    weights = weights if weights is not None else [1 / len(states)] * len(states)
    new = {}
    for key, old in global_state.items():
        average = sum(w * s[key].double() for w, s in zip(weights, states))
        if not old.is_floating_point():
            new[key] = average.round().to(old.dtype)
            continue
        new[key] = (old.double() + step(key, average - old.double())).to(old.dtype)
    return new


def fedavgm(global_state: Mapping[str, torch.Tensor], states: list[Mapping[str, torch.Tensor]],
            velocity: dict[str, torch.Tensor], momentum: float,
            weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The average of the schools' models (uniform, or `weights`), then the FedAvgM server step as Flower's
    FedAvgM takes it (server learning rate 1; `velocity` carries the momentum between rounds)."""

    def with_momentum(key: str, delta: torch.Tensor) -> torch.Tensor:
        if momentum > 0:
            delta = momentum * velocity[key] + delta if key in velocity else delta
            velocity[key] = delta
        return delta

    return server_step(global_state, states, with_momentum, weights)


def train_noise_free(cfg: Mapping[str, Any], schools: list[Any], start: Mapping[str, torch.Tensor],
                     declared_units: list[int], after_round: Callable[[int, torch.nn.Module], None] | None = None,
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(d): `federation.rounds` rounds of the federation with the noise off — every school trains from the
    round's global model with the ClientApp's plan rule and trainer at σ ≈ 0 (clipping, q and steps as
    planned for its declared size; the step-size rule sees no noise, so the step is `train.lr`), then the
    server's step: the average weighted by the declared sizes and FedAvgM's momentum
    (`federation.server_momentum`, server learning rate 1, as Flower's FedAvgM). Every school takes part
    in every round: `federation.fraction_train` is not replayed, and a school that left the real run (its
    budget spent, a failure) still trains here. With `federation.client_dp` the server averages unweighted
    and without momentum, as the strategy does then (its client-level clipping and noise are off here too)."""
    quiet = {**cfg, "privacy.noise_multiplier": NOISE_FREE_SIGMA}
    model, local = model_from(cfg, start), model_from(cfg, start)
    client_dp = bool(cfg["federation.client_dp"])
    weights = [1 / len(schools) if client_dp else units / sum(declared_units) for units in declared_units]
    momentum = 0.0 if client_dp else float(cfg["federation.server_momentum"])
    velocity: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for rnd in range(1, int(cfg["federation.rounds"]) + 1):
        old = {k: v.detach().clone() for k, v in model.state_dict().items()}
        states = []
        for index, school in enumerate(schools):
            local.load_state_dict(old)
            dp_round(local, school, quiet, seed=int(cfg["run.seed"]) * 100_000 + rnd * 1000 + index,
                     declared_units=declared_units[index])
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
        model.load_state_dict(fedavgm(old, states, velocity, momentum, weights))
        if after_round is not None:
            after_round(rnd, model)
    return model, {"rounds": int(cfg["federation.rounds"]), "schools": len(schools), "privacy": "none",
                   "noise_multiplier": NOISE_FREE_SIGMA, "seconds": round(time.perf_counter() - started, 1)}


def pick_schools(sizes: list[int], count: int) -> list[int]:
    """Indices of `count` schools from the smallest to the largest, evenly between (0 or more than
    there are: all)."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    if count <= 0 or count >= len(sizes):
        return sorted(order)
    return sorted({order[round(k * (len(order) - 1) / max(count - 1, 1))] for k in range(count)})


# ---------------------------------------------------------------------------- the run's references
def start_state(cfg: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """The federation's starting weights: the pre-trained checkpoint, else the model seeded by run.seed."""
    from shared_models.models import registry

    torch.manual_seed(int(cfg["run.seed"]))
    model = registry.build_from_config({**cfg, "train.trainable": "all"})
    source = "untrained model (run.seed)"
    if cfg.get("model.pretrained"):
        registry.load_pretrained(model, str(cfg["model.pretrained"]))
        source = str(cfg["model.pretrained"])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, source


def _declared_units(cfg: Mapping[str, Any], run_dir: Path, school_id: str, school: Any) -> int:
    """The public size the school's own policy declares (what its federated rounds were planned with)."""
    from client.node import simulated_state_dir
    from privacy.policy import declared_size_bucket, read_policy_file

    policy = read_policy_file(simulated_state_dir(cfg, run_dir, school_id))
    if policy is not None:
        return int(policy.declared_units)
    return declared_size_bucket(school.num_students if cfg["privacy.unit"] == "student" else len(school))


def _final_federated(run_dir: Path) -> tuple[int, torch.nn.Module] | None:
    from server.run_dir import RunDirectory, model_from_checkpoint

    checkpoint = RunDirectory(run_dir).latest_checkpoint()
    if checkpoint is None:
        return None
    return int(checkpoint["round"]), model_from_checkpoint(checkpoint, run_dir / "checkpoints")


def _best_federated(run_dir: Path, echo: Echo) -> tuple[int, torch.nn.Module] | None:
    """checkpoints/best.pt's round and model (what the schools get when the run kept one), or None."""
    from server.run_dir import BEST_CHECKPOINT, CheckpointError, load_checkpoint_file, model_from_checkpoint

    path = run_dir / "checkpoints" / BEST_CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = load_checkpoint_file(path)
        return int(checkpoint["round"]), model_from_checkpoint(checkpoint, path)
    except CheckpointError as exc:
        echo(f"the best round's model is not scored: {exc}")
        return None


def compute_references(cfg: Mapping[str, Any], run_dir: Path, data_root: Path, echo: Echo = print) -> Path | None:
    """Train and score the references `evaluation.references` asks for; write ``<run_dir>/references.json``.
    Returns its path, or None when none is asked for."""
    from shared_models.datasets.school_folder import load_school
    from simulations import synth

    kinds = requested(cfg)
    if not kinds:
        return None
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(int(cfg["train.threads"]))
    started = time.perf_counter()
    start, source = start_state(cfg)
    ids = [synth.school_id(i) for i in range(int(cfg["federation.schools"]))]
    schools = [load_school(Path(data_root) / "schools" / sid) for sid in ids]
    score = Scorer(Path(data_root), int(model_from(cfg, start).input_size), int(cfg["evaluation.bootstrap"]))
    record: dict[str, Any] = {"format": FORMAT, "benchmarks": {"public": PUBLIC, "indomain": INDOMAIN},
                              "start": {"source": source, "scores": score(model_from(cfg, start), per_school=True)}}
    final = _final_federated(Path(run_dir))
    if final is not None:
        record["federated"] = {"round": final[0], "scores": score(final[1], per_school=True)}
    best = _best_federated(Path(run_dir), echo)   # the model the schools get (server/added.py compares it)
    if best is not None:
        same = final is not None and final[0] == best[0]
        record["best"] = {"round": best[0], "scores": record["federated"]["scores"] if same else score(best[1], per_school=True)}
    own = _own_models(cfg, Path(run_dir), ids, score, echo)
    if own:
        record["own"] = own
    if "central" in kinds:
        epochs = int(cfg["evaluation.central_epochs"])
        echo(f"reference (b): one central model on the pooled schools, no privacy, {counted(epochs, 'epoch')}")
        model, info = train_central(cfg, schools, start, epochs, seed=int(cfg["run.seed"]),
                                    after_epoch=_every_eighth(epochs, lambda e: echo(f"  (b) epoch {e}/{epochs}")))
        record["central"] = {**info, "privacy": "none", "scores": score(model)}
    if "alone" in kinds:
        record["alone"] = _alone_references(cfg, Path(run_dir), ids, schools, start, score, echo)
    if "noise-free" in kinds:
        rounds = int(cfg["federation.rounds"])
        echo(f"reference (d): the same federation with the noise off (not private), {counted(rounds, 'round')}, "
             f"{counted(len(schools), 'school')}")
        curve: list[dict[str, Any]] = []
        last: dict[str, Any] = {}

        def after_round(rnd: int, model: torch.nn.Module) -> None:
            last["scores"] = scores = score(model)
            # every round with its CIs: the report compares the federation's kept round with (d) at that round
            curve.append({"round": rnd, **{name: scores[name]["accuracy"] for name in (PUBLIC, INDOMAIN)},
                          "scores": {name: scores[name] for name in (PUBLIC, INDOMAIN)}})
            echo(f"  (d) round {rnd}/{rounds}: public {scores[PUBLIC]['accuracy']:.3f}, "
                 f"in-domain {scores[INDOMAIN]['accuracy']:.3f}")

        declared = [_declared_units(cfg, Path(run_dir), sid, school) for sid, school in zip(ids, schools)]
        _, info = train_noise_free(cfg, schools, start, declared, after_round=after_round)
        record["noise-free"] = {**info, "curve": curve, "scores": last["scores"]}
    record["seconds"] = round(time.perf_counter() - started, 1)
    return _write(Path(run_dir) / FILE, record)


def _every_eighth(total: int, show: Callable[[int], None]) -> Callable[[int, torch.nn.Module], None]:
    """An after-epoch hook that reports progress about eight times over `total` epochs (and at the end)."""
    every = max(1, total // 8)
    return lambda epoch, _model: show(epoch) if epoch % every == 0 or epoch == total else None


def _alone_references(cfg: Mapping[str, Any], run_dir: Path, ids: list[str], schools: list[Any],
                      start: Mapping[str, torch.Tensor], score: Scorer, echo: Echo) -> dict[str, Any]:
    picks = pick_schools([s.num_students for s in schools], int(cfg["evaluation.reference_schools"]))
    out: dict[str, Any] = {}
    for i in picks:
        declared = _declared_units(cfg, run_dir, ids[i], schools[i])
        echo(f"reference (c): {ids[i]} alone ({counted(int(schools[i].num_students), 'student')}), same DP, "
             f"{counted(int(cfg['federation.rounds']), 'round')}")
        model, info = train_alone(cfg, schools[i], i, start, declared_units=declared)
        out[ids[i]] = {**info, "students": int(schools[i].num_students), "scores": score(model, school=i)}
    return out


def _own_models(cfg: Mapping[str, Any], run_dir: Path, ids: list[str], score: Scorer, echo: Echo) -> dict[str, Any]:
    """Each school's own last model (client/school_round.py `keep_own_model`), scored on its held-out students
    and the pooled sets: what a school that keeps it gets beside the final global model."""
    from client.node import simulated_state_dir
    from client.school_round import OWN_MODEL
    from server.run_dir import CheckpointError, load_checkpoint_file, model_from_checkpoint

    out: dict[str, Any] = {}
    for index, sid in enumerate(ids):
        path = simulated_state_dir(cfg, run_dir, sid) / OWN_MODEL
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint_file(path)
            out[sid] = {"round": int(checkpoint["round"]),
                        "scores": score(model_from_checkpoint(checkpoint, path), school=index)}
        except CheckpointError as exc:
            echo(f"{sid}: its own model is not scored: {exc}")
    return out


def _write(path: Path, record: Mapping[str, Any]) -> Path:
    from shared_models.atomic_files import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))
    return path

