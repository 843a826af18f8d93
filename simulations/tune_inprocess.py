"""Compare training settings fast: FedAvg(M) in one process over the real school training code.

    python -m simulations.tune_inprocess [--label NAME] [--out benchmarks/tune/NAME.json] [key=value ...]

Each round, every synthetic school trains a copy of the global model with the same rule and trainer
(privacy/engine.py: q from the declared size `fedfer simulate` writes into each school's policy, Opacus
DP-SGD at the configured privacy unit) as the ClientApp. The replies are averaged uniformly, as the
server does, and FedAvgM's server momentum is applied as in Flower's `FedAvgM`:
v = m * v + (avg - w), w = w + v. The global model is then scored with the evaluation node's code.

It is a tuning harness, not the federation. It has no Flower, no ledger, no budget guard and no reply
validation, and the schools train one after another, so its wall time is not the demo's. Use
`fedfer simulate` for anything you report as a run. The σ each school uses is the one the engine
calibrates for `federation.rounds` rounds at `privacy.target_epsilon`, so the ε reached is the demo's.
Prints one line per round and a final table; writes JSON with the command that produced it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from privacy.engine import plan_from_config, train_private
from privacy.policy import declared_size_bucket
from shared_models.datasets.school_folder import load_school
from shared_models.evaluation import evaluate_benchmarks
from shared_models.models import registry
from shared_models.training import FaceDataset, make_optimizer
from shared_models.transforms import train_transform
from shared_models.config import ConfigError, load_config
from simulations.bench.results import write_result


def _build(cfg: dict) -> torch.nn.Module:
    model = registry.build_from_config(cfg)
    return registry.scale_aux_losses(model, float(cfg["model.aux_loss_weight"]))


def server_step(global_state: dict[str, torch.Tensor], average: dict[str, torch.Tensor],
                velocity: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
    """FedAvgM's server update (server learning rate 1): updates `velocity` in place, returns the new
    global state. Integer buffers take the average as is."""
    new = {}
    for key, old in global_state.items():
        if not old.is_floating_point():
            new[key] = average[key].to(old.dtype)
            continue
        step = average[key] - old.double()
        if momentum > 0:
            step = momentum * velocity[key] + step if key in velocity else step
            velocity[key] = step
        new[key] = (old.double() + step).to(old.dtype)
    return new


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="", help="name of this setting in the output (default: the overrides)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/tune/<label>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _load_schools(cfg: dict) -> tuple[Path, list]:
    """The synthetic classroom of `cfg` (built if missing) and every school's training data."""
    from simulations import synth

    torch.set_num_threads(int(cfg["train.threads"]))
    # Opacus' hooks on the first layer, whose input needs no gradient: harmless, and once per round is noise.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    root = synth.ensure_for_config(cfg)
    schools = [load_school(d) for d in sorted((root / "schools").iterdir()) if d.is_dir()]
    print(f"{len(schools)} schools: students {[s.num_students for s in schools]}", flush=True)
    return root, schools


def _write_history(out: Path, label: str, overrides: list[str], schools: list, history: list[dict],
                   argv: list[str] | None) -> None:
    """Print the per-round table and write it as JSON with the command that produced it."""
    print(f"\n{'round':>5} {'accuracy':>9} {'macro-F1':>9} {'seconds':>8}")
    for row in history:
        print(f"{row['round']:>5} {row['accuracy']:>9.3f} {row['macro_f1']:>9.3f} {row['seconds']:>8.0f}")
    write_result(out, {"label": label, "overrides": overrides, "students": [s.num_students for s in schools],
                       "history": history}, module="simulations.tune_inprocess", argv=argv)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(None, args.overrides)
    except ConfigError as exc:
        print(f"tune_inprocess: {exc}", file=sys.stderr)
        return 2
    label = args.label or ("defaults" if not args.overrides else "_".join(args.overrides).replace("/", "-"))
    out = args.out or Path("benchmarks/tune") / f"{label}.json"
    root, schools = _load_schools(cfg)
    torch.manual_seed(int(cfg["run.seed"]))
    model = _build(cfg)
    local = _build(cfg)  # one school model, reloaded with the global weights before each school trains
    momentum = float(cfg["federation.server_momentum"])
    velocity: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    history = []
    for rnd in range(1, int(cfg["federation.rounds"]) + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        total: dict[str, torch.Tensor] = {}
        weight, steps, sigma = 0, [], 0.0
        for index, school in enumerate(schools):
            local.load_state_dict(global_state)
            # the declared size `fedfer simulate` writes into the school's policy
            student_unit = cfg["privacy.unit"] == "student"
            plan = plan_from_config(cfg, declared_size_bucket(school.num_students if student_unit else len(school)))
            frames = FaceDataset(school.images, school.labels, train_transform(local.input_size, bool(cfg["train.augment"])))
            result = train_private(local, frames, school.student_ids if student_unit else None, plan,
                                   make_optimizer(local, cfg, plan.noise_multiplier), int(cfg["train.local_epochs"]))
            steps.append(result.steps)
            sigma = max(sigma, plan.noise_multiplier)
            for key, value in local.state_dict().items():  # uniform FedAvg, as the server does
                total[key] = total.get(key, 0) + value.double()
            weight += 1
        model.load_state_dict(server_step(global_state, {k: v / weight for k, v in total.items()}, velocity, momentum))
        results = evaluate_benchmarks(model, str(cfg["evaluation.benchmarks"]), root, cfg)
        name, metrics = next(iter(results.items()))
        row = {"round": rnd, "benchmark": name, "accuracy": round(metrics["accuracy"], 4),
               "macro_f1": round(metrics["macro_f1"], 4), "max_sigma": round(sigma, 3),
               "steps_per_school": steps, "seconds": round(time.perf_counter() - started, 1)}
        history.append(row)
        print(f"round {rnd}: {name} accuracy {row['accuracy']:.3f} macro-F1 {row['macro_f1']:.3f} "
              f"σ ≤ {sigma:.2f} steps {min(steps)}-{max(steps)} ({row['seconds']:.0f} s)", flush=True)

    _write_history(out, label, args.overrides, schools, history, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
