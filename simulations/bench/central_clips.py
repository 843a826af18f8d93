"""Centralised reference of a clip model on synthetic expression clips, without DP and under student-level DP.

    python -m simulations.bench.central_clips [--model r2plus1d_sta] [--preset cpu] [--dp] [--epsilon 8]
        [--students 400] [--clips-per-student 2] [--test-students 150] [--epochs 10] [--batch 32]
        [--optimizer adam] [--lr 0.003] [--seed 0] [--threads 1] [--out benchmarks/central-clips-....json]

Training clips: `--students` synthetic students of school 0, `--clips-per-student` onset -> apex clips
each (`simulations.synthetic_clips`, balanced FER7 labels), at the preset's clip size. Test clips: other
students of the same school (disjoint identities), one clip each. Without --dp: Adam / SGD minibatches
over the clips. With --dp: the federation's DP engine (`privacy.engine.train_private`), unit = student
(all of a student's clips are one unit; one clip drawn per sampled student per step), σ calibrated so
the whole run ends at --epsilon (δ 1e-5, PRV accountant), the ε reported back from the accountant fed
with the q, σ and steps that ran. Reports accuracy (= WAR) with a bootstrap 95 % CI, UAR and chance.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils.data import TensorDataset

from simulations.bench.results import write_result


def _train_plain(model, data: TensorDataset, args: argparse.Namespace) -> float:  # type: ignore[no-untyped-def]
    from shared_models.models import registry

    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    opt = _optimizer(model, args)
    total, n = 0.0, 0
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = registry.per_sample_loss(model, model(x), y).mean()
        loss.backward()
        opt.step()
        total, n = total + float(loss.detach()) * len(y), n + len(y)
    return total / n


def evaluate_clips(model, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> dict:  # type: ignore[no-untyped-def]
    """classification_report (accuracy = WAR, UAR, bootstrap CI) of `model` on clips x (N, 3, T, S, S)."""
    from shared_models.metrics import classification_report

    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).logits.argmax(dim=1) for i in range(0, len(x), batch)])
    model.train(was_training)
    return classification_report(y.numpy(), pred.numpy(), 7)


def _optimizer(model, args: argparse.Namespace) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
    if args.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=args.lr)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.5)


def run(args: argparse.Namespace) -> dict:
    """Train and evaluate one configuration; returns the result record."""
    from privacy.engine import plan_round, train_private
    from shared_models.models import registry
    from simulations.synthetic_clips import make_clips

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = registry.build(args.model, 7, args.preset)
    size, frames = model.input_size, model.clip_frames
    train = make_clips(args.students, args.clips_per_student, size, frames, seed=args.seed)
    test = make_clips(args.test_students, 1, size, frames, seed=args.seed, first_student=args.students)
    train_set = TensorDataset(*train.tensors())
    plan, history, started = None, [], time.perf_counter()
    if args.dp:
        plan = plan_round(unit="student", declared_units=args.students, units_per_batch=args.batch,
                          local_epochs=1, rounds=args.epochs, target_epsilon=args.epsilon, delta=1e-5,
                          noise_multiplier=0.0, max_grad_norm=args.clip, frames_per_unit=1)
    opt = _optimizer(model, args)
    for epoch in range(1, args.epochs + 1):
        if plan is not None:
            loss = train_private(model, train_set, train.student_ids, plan, opt, local_epochs=1).mean_loss
        else:
            loss = _train_plain(model, train_set, args)
        report = evaluate_clips(model, *test.tensors())
        history.append({"epoch": epoch, "loss": round(loss, 4), "accuracy": round(report["accuracy"], 4)})
        print(f"epoch {epoch}/{args.epochs}: loss {loss:.3f} test accuracy {report['accuracy']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return _record(args, model, plan, report, history, len(train_set), time.perf_counter() - started)


def _record(args, model, plan, report, history, n_train, seconds) -> dict:  # type: ignore[no-untyped-def]
    epsilon = None
    if plan is not None:
        from opacus.accountants import PRVAccountant

        acct = PRVAccountant()
        acct.history = [(plan.noise_multiplier, plan.sample_rate, plan.steps * args.epochs)]
        epsilon = float(acct.get_epsilon(1e-5))
    keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "uar", "war", "macro_f1", "n", "per_class_recall")
    return {
        "model": args.model, "preset": args.preset, "clip": f"{model.clip_frames}x{model.input_size}x{model.input_size}",
        "dp": bool(args.dp), "privacy_unit": "student" if args.dp else None,
        "noise_multiplier": plan.noise_multiplier if plan else None, "sample_rate": plan.sample_rate if plan else None,
        "steps": plan.steps * args.epochs if plan else None, "epsilon": epsilon, "delta": 1e-5 if plan else None,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "train_clips": n_train, "train_students": args.students, "test_clips": report["n"], "chance": 1 / 7,
        "final": {k: report[k] for k in keys}, "history": history, "seconds": round(seconds, 1),
        "data": "simulations.synthetic_clips: onset->apex synthetic clips, balanced FER7, school 0; "
                "test = other students of the same school",
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="r2plus1d_sta")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--dp", action="store_true")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--clip", type=float, default=1.0, help="DP clipping norm per student")
    p.add_argument("--students", type=int, default=400)
    p.add_argument("--clips-per-student", type=int, default=2)
    p.add_argument("--test-students", type=int, default=150)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="clips per step (DP: expected students per step)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/central-clips-<model>-<preset>-<dp|nodp>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    record = run(args)
    out = args.out or f"benchmarks/central-clips-{args.model}-{args.preset}-{'dp' if args.dp else 'nodp'}.json"
    path = write_result(out, record, module="simulations.bench.central_clips", argv=argv)
    f = record["final"]
    print(f"accuracy {f['accuracy']:.3f} [{f['accuracy_ci_low']:.3f}, {f['accuracy_ci_high']:.3f}] UAR {f['uar']:.3f} "
          f"(chance {1 / 7:.3f})" + (f" at ε {record['epsilon']:.2f}" if record["epsilon"] else "") + f"; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
