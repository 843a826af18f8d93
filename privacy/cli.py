"""``fedfer privacy audit | plan | attack``. Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("privacy", help="privacy ledger audit, noise planner, empirical audit")
    psub = p.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    a = psub.add_parser("audit", help="recompute every school's ε from its ledger; verify hashes, chain, signatures",
                        description="Recompute ε from the raw ledger entries (never trusting stored ε), verify hashes, "
                                    "prev_hash chain and Ed25519 signatures, compare with budgets. Exit 0 intact and "
                                    "within budget, 1 over budget, 2 tampered, inconsistent or unreadable.")
    a.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR|LEDGER.jsonl",
                   help="a run directory (<run>/ledger/<school>.jsonl, keys in <run>/keys/<school>.pub), a school's "
                        "state directory or ledger.jsonl, or ledger files")
    a.add_argument("--keys", type=Path, default=None, metavar="DIR",
                   help="trusted keyring <DIR>/<school>.pub (overrides keys stored beside the ledgers)")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a.add_argument("--every-entry", action="store_true",
                   help="check every entry's stored ε against PRV (default: the last per dataset; RDP for all)")
    a.add_argument("--budget", type=float, default=None, help="compare with this ε budget instead of the ledger's")
    a.set_defaults(func=_audit)

    pl = psub.add_parser("plan", help="noise multiplier for a target ε, and the ε-per-round curve",
                         description="The noise a school needs so that, sampled every round, it ends at the target ε.")
    pl.add_argument("--epsilon", type=float, required=True)
    pl.add_argument("--delta", type=float, required=True)
    pl.add_argument("--rounds", type=int, required=True)
    pl.add_argument("--local-epochs", type=int, required=True)
    pl.add_argument("--students", type=int, required=True, help="privacy units at the school (students or images)")
    pl.add_argument("--batch", type=int, required=True, help="expected units per DP step")
    pl.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    pl.add_argument("--points", type=int, default=12, help="rows of the curve (all rounds if fewer)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_plan)

    at = psub.add_parser("attack", help="empirical one-run membership-inference lower bound on ε (canaries)",
                         description="Insert m canaries (random-pattern images, random labels, each included by a fair "
                                     "coin) into one school's data, train with the DP trainer, score canaries by loss "
                                     "and report the Steinke-Nasr-Jagielski (2023) lower bound on ε. Exit 1 if the "
                                     "bound exceeds the claimed ε (a privacy bug).")
    at.add_argument("run_dir", nargs="?", type=Path, default=None,
                    help="take ε, δ, clipping, unit, batch, frames per student and lr from <RUN_DIR>/config.yaml")
    mode = at.add_mutually_exclusive_group()
    mode.add_argument("--epsilon", type=float, default=None, help="claimed ε to calibrate the noise for (default 8)")
    mode.add_argument("--no-dp", action="store_true", help="the control: same clipping, no noise")
    at.add_argument("--canaries", type=int, default=500)
    at.add_argument("--epochs", type=int, default=10)
    at.add_argument("--batch", type=int, default=None, help="expected units per step (default 16)")
    at.add_argument("--frames-per-unit", type=int, default=None, help="frames per sampled student (default 4)")
    at.add_argument("--unit", choices=("student", "image"), default=None)
    at.add_argument("--clip", type=float, default=None, help="max grad norm (default 1.0)")
    at.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.3)")
    at.add_argument("--delta", type=float, default=None, help="default 1e-5")
    at.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the bound")
    at.add_argument("--image-size", type=int, default=16, help="side the faces are resized to for the harness model")
    at.add_argument("--data-dir", type=Path, default=None,
                    help="a school's data directory (labels.csv + images); default: a small synthetic school")
    at.add_argument("--cache", type=Path, default=None, help="where the default synthetic school is built")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--threads", type=int, default=2)
    at.add_argument("--json", action="store_true")
    at.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    at.set_defaults(func=_attack)


# ------------------------------------------------------------------------------------------ audit
def _audit(args: argparse.Namespace) -> int:
    from privacy.audit import format_table, run_audit

    report = run_audit(args.paths, args.keys, every_entry=args.every_entry, budget_override=args.budget)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_table(report))
    return report.exit_code


# ------------------------------------------------------------------------------------------ plan
def _plan(args: argparse.Namespace) -> int:
    from privacy.accounting import AccountingError
    from privacy.planner import format_plan, make_plan

    try:
        plan = make_plan(args.epsilon, args.delta, args.rounds, args.local_epochs, args.students, args.batch,
                         accountant=args.accountant, max_points=max(2, args.points))
    except (AccountingError, ValueError) as exc:
        print(f"fedfer privacy plan: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


# ------------------------------------------------------------------------------------------ attack
def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{path}: not found (a run directory holds its resolved config.yaml)")
    import yaml

    from shared_models.config import flatten

    try:
        return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None


def _attack(args: argparse.Namespace) -> int:
    import torch

    from privacy.empirical_audit import run_canary_audit, tiny_model_builder

    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = _run_config(args.run_dir)
    except ValueError as exc:
        print(f"fedfer privacy attack: {exc}", file=sys.stderr)
        return 2

    def pick(flag, key, default):
        return flag if flag is not None else cfg.get(key, default)

    epsilon = None if args.no_dp else float(pick(args.epsilon, "privacy.target_epsilon", 8.0))
    delta = float(pick(args.delta, "privacy.delta", 1e-5))
    unit = pick(args.unit, "privacy.unit", "student")
    batch = int(pick(args.batch, "train.batch_size", 16))
    frames_per_unit = int(pick(args.frames_per_unit, "train.frames_per_student", 4))
    clip = float(pick(args.clip, "privacy.max_grad_norm", 1.0))
    lr = float(pick(args.lr, None, 0.3))

    x, y, units, source = _school_tensors(args, unit)
    print(f"data: {source}: {len(y)} frames, {len(set(units)) if units else len(y)} {unit}s, "
          f"{args.image_size}x{args.image_size}; {args.canaries} canaries", flush=True)
    result = run_canary_audit(x, y, units, tiny_model_builder(tuple(x.shape[1:])), canaries=args.canaries,
                              epsilon=epsilon, delta=delta, epochs=args.epochs, units_per_batch=batch,
                              frames_per_unit=frames_per_unit, max_grad_norm=clip, lr=lr, beta=args.beta,
                              seed=args.seed, progress=lambda s: print("  " + s, flush=True))
    out = result.to_json()
    argv = sys.argv[1:]
    out["command"] = ("fedfer " + " ".join(argv)) if argv[:2] == ["privacy", "attack"] else "fedfer privacy attack (in-process)"
    out["data"] = source
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    b = result.bound
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        claimed = "∞ (DP off)" if math.isinf(result.claimed_epsilon) else f"{result.claimed_epsilon:.3f}"
        print(f"claimed ε {claimed} (σ {result.noise_multiplier:.4f}, q {result.sample_rate:.4g}, {result.steps} steps, "
              f"δ {delta:g})")
        print(f"canaries {result.canaries} ({result.included} included); mean loss in {result.canary_loss_in:.3f}, "
              f"out {result.canary_loss_out:.3f}")
        print(f"guesses {b.r} (k = {b.k} each side, best of {b.ks_tried}), correct {b.v}")
        print(f"empirical lower bound ε ≥ {b.epsilon_lb:.3f} at {b.confidence:.0%} confidence ({result.seconds:.0f} s)")
    if result.dp and b.epsilon_lb > result.claimed_epsilon:
        print("PRIVACY BUG: the empirical lower bound exceeds the claimed ε", file=sys.stderr)
        return 1
    return 0


def _school_tensors(args: argparse.Namespace, unit: str):
    """Faces of one school as model inputs (N, 3, S, S) in [-1, 1], labels, unit ids."""
    import torch

    from client.school_data import load_school

    data_dir = args.data_dir
    if data_dir is None:
        from simulations.synth import SynthParams, ensure_school

        cache = args.cache or Path.home() / ".cache" / "fedfer" / "attack-synth"
        params = SynthParams(schools=1, students_per_school=24, frames_per_student=8, image_size=32, seed=7,
                             public_students=4)
        data_dir = ensure_school(cache, params, 0)
    school = load_school(data_dir)
    if len(school) == 0:
        # exit 2 (bad input): exit 1 is kept for "the bound exceeds the claimed ε", a privacy bug
        print(f"fedfer privacy attack: {data_dir}: no usable images"
              + (f" ({school.describe_skips()})" if school.skipped else ""), file=sys.stderr)
        raise SystemExit(2)
    x = torch.from_numpy(school.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = torch.nn.functional.interpolate(x, size=(args.image_size, args.image_size), mode="area")
    y = torch.from_numpy(school.labels).long()
    return x, y, (list(school.student_ids) if unit == "student" else None), str(data_dir)
