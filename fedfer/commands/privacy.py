"""``fedfer privacy audit | plan | canary-audit`` (alias ``attack``). Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fedfer.commands import UsageError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("privacy", help="privacy ledger audit, noise planner, empirical audit")
    psub = p.add_subparsers(dest="privacy_command", metavar="SUBCOMMAND", parser_class=_PrivacyArgumentParser)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    _add_audit_parser(psub)
    _add_plan_parser(psub)
    _add_canary_audit_parser(psub)


# what a privacy officer types; argparse's RawDescriptionHelpFormatter keeps the lines as written
AUDIT_EXAMPLES = """\
examples:
  fedfer privacy audit runs/<id> --keys deploy/keys
      every school's copy of a run, against the keys registered at enrollment
  fedfer privacy audit runs/<id> /school/state/ledger.jsonl --keys deploy/keys
      with a school's own ledger: its lifetime ε over all runs, cross-checked with the run's copy
  fedfer privacy audit /school/state/ledger.jsonl --keys DIR --anchors runs/anchors
      a school's ledger against the coordinator's anchors (a cut-short or rewritten ledger)
  fedfer privacy audit ledger.jsonl --keys DIR --json > audit.json
      offline, with only what a school hands over: its ledger.jsonl and its public key saved
      as DIR/<school>.pub (its policy as DIR/<school>.policy.json, or give --budget EPS)

The output: one row per ledger (budget left, which run), one lifetime line per school (ε, its
budget, the share used, what is left), 'next:' lines saying what to do, and the verdict.
"""


class _PrivacyArgumentParser(argparse.ArgumentParser):
    """The parser of each `privacy` sub-command. With --json among its words, a usage error argparse finds (an
    unknown flag, a missing path, a value that is not a number) is one JSON object on stdout, exit 2, like every
    other outcome of `privacy audit | plan | canary-audit --json` (print_usage_error); without --json, argparse's
    usage line and error on stderr."""

    command = ""   # the sub-command this parser reads ("audit", "plan", "canary-audit"); set by _json_errors
    json_requested = False

    def parse_known_args(self, args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        # the words before "--" (after it every word is a path); "--js" is argparse's abbreviation of --json
        flags = words[:words.index("--")] if "--" in words else words
        self.json_requested = any(len(w) >= 4 and "--json".startswith(w) for w in flags)
        return super().parse_known_args(words, namespace)

    def error(self, message: str):
        if self.command and self.json_requested:
            print_usage_error(self.command, message, as_json=True)
            self.exit(2)
        super().error(message)


def print_usage_error(command: str, message: str, as_json: bool) -> int:
    """A usage error of `privacy <command>`: one line on stderr, or with --json one JSON object on stdout
    (privacy/audit.py usage_error_json: the audit's carries its report's keys, with nothing audited, so an
    archive that reads every audit as one object reads this one too). Returns the exit code, 2."""
    from privacy.audit import EXIT_USAGE, usage_error_json

    if as_json:
        print(json.dumps(usage_error_json(message, audit_keys=command == "audit"), indent=2))
    else:
        print(f"fedfer privacy {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def _json_errors(parser: argparse.ArgumentParser, command: str) -> None:
    """Usage errors of `parser` (argparse's, and words no parser took: fedfer/cli.py) as print_usage_error."""
    parser.command = command
    parser.set_defaults(usage_error=lambda message, args: print_usage_error(command, message, args.json))


def _add_audit_parser(psub: argparse._SubParsersAction) -> None:
    a = psub.add_parser("audit", help="recompute every school's ε from its ledger; verify hashes, chain, signatures",
                        description="Recompute ε from the raw ledger entries (never trusting stored ε), verify hashes, "
                                    "prev_hash chain and Ed25519 signatures against an independent keyring (--keys), "
                                    "compare with each school's policy budget, check the server's anchors. Exit 0 "
                                    "intact (and within budget where one is known: the verdict says when none is), "
                                    "1 over budget, 2 tampered, inconsistent, unreadable, several schools under one name (each run "
                                    "audited on its own) or a usage error: the verdict says which.",
                        epilog=AUDIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR|LEDGER.jsonl",
                   help="a run directory (<run>/ledger/<school>.jsonl), a school's state directory or ledger.jsonl, "
                        "or ledger files")
    a.add_argument("--keys", type=Path, default=None, metavar="DIR",
                   help="independent keyring <DIR>/<school>.pub: the ledger keys registered at enrollment "
                        "(deploy/keys); school policies are read beside it (<DIR>/<school>.policy.json or "
                        "<DIR>/../nodes/<school>/node-config.toml)")
    a.add_argument("--trust-run-keys", action="store_true",
                   help="also accept keys stored in the run (<run>/keys) or beside a school's ledger, and the "
                        "simulated schools' policy.json in their state dirs (a simulated run has no keyring); "
                        "whoever wrote the run can swap those, so a swapped key and re-signed entries pass")
    a.add_argument("--anchors", type=Path, default=None, metavar="DIR",
                   help="the server's ledger anchors (default <run.root>/anchors beside each run directory)")
    a.add_argument("--json", action="store_true",
                   help="print JSON instead of a table (verdict, exit_code, audited_at, fedfer version, lifetime "
                        "per school with budget_left, next, problems, notes, every row): for an archive")
    a.add_argument("--every-entry", action="store_true",
                   help="check every entry's stored ε against PRV (default: the last per dataset; RDP for all)")
    a.add_argument("--budget", type=float, default=None, metavar="EPS",
                   help="compare every school with this ε budget (default: each school's policy; never the "
                        "budget an entry declares)")
    a.set_defaults(func=_audit)
    _json_errors(a, "audit")


def _add_plan_parser(psub: argparse._SubParsersAction) -> None:
    pl = psub.add_parser("plan", help="noise multiplier for a target ε, and the ε-per-round curve",
                         description="The noise a school needs so that, sampled every round, it ends at the target ε.")
    pl.add_argument("--epsilon", type=float, required=True)
    pl.add_argument("--delta", type=float, required=True)
    pl.add_argument("--rounds", type=int, required=True)
    pl.add_argument("--local-epochs", type=int, required=True)
    pl.add_argument("--students", type=int, required=True, help="the school's declared size in privacy units (its policy's public number, not the exact count)")
    pl.add_argument("--batch", type=int, required=True, help="expected units per DP step")
    pl.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    pl.add_argument("--points", type=int, default=12,
                    help="rows of the curve, at least 2: the first and the last round (all rounds if fewer)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_plan)
    _json_errors(pl, "plan")


def _add_canary_audit_parser(psub: argparse._SubParsersAction) -> None:
    at = psub.add_parser(
        "canary-audit", aliases=["attack"],
        help="empirical lower bound on ε from canaries in one run (white-box audit of the DP trainer)",
        description="White-box (default): train the student-level DP trainer with Dirac canary students (each "
                    "included by a fair coin), read every noisy update, and report the Steinke-Nasr-Jagielski "
                    "(2023) and f-DP (Mahloujifar-Melis-Chaudhuri 2025) one-run lower bounds on ε, jointly at "
                    "1-β confidence, beside the ε the trainer's record claims. --black-box: the outsider's audit "
                    "(final model only, canaries scored by loss). Exit 0: bounds at or below the claim; 1: a "
                    "bound above the claimed ε (a privacy bug); 2: bad input.")
    at.add_argument("run_dir", nargs="?", type=Path, default=None,
                    help="take ε, δ and clipping from <RUN_DIR>/config.yaml")
    mode = at.add_mutually_exclusive_group()
    mode.add_argument("--epsilon", type=float, default=None, help="claimed ε to calibrate the noise for (default 4)")
    mode.add_argument("--no-dp", action="store_true", help="the control: same clipping, no noise")
    at.add_argument("--black-box", action="store_true",
                    help="the outsider's audit: only the final model, canaries scored by their loss (loose)")
    at.add_argument("--canaries", type=int, default=None,
                    help=f"canary students (default 8000 white-box, 500 black-box); at most {MAX_CANARIES}, and "
                         f"white-box at most {MAX_CANARIES_PER_RUN} per run (--canaries / --runs): each step of a run "
                         f"feeds its probe a one-hot of frames x canaries-in-the-run, about 1 GB at "
                         f"{MAX_CANARIES_PER_RUN} with every student sampled; black-box, {MAX_CANARIES} canary "
                         f"images at 16x16 are about 1 GB; and at most {MAX_CANARY_BYTES // 2**30} GB for the "
                         f"canaries at the faces' size (a registered model's 64x64 input makes each 16x bigger)")
    at.add_argument("--runs", type=int, default=16, help="independent trainings the canaries are spread over")
    at.add_argument("--epochs", type=int, default=10)
    at.add_argument("--batch", type=int, default=None,
                    help="expected students per step (default: all, q = 1 white-box; 16 black-box)")
    at.add_argument("--frames-per-unit", type=int, default=None, help="frames per canary student (default 2)")
    at.add_argument("--score", choices=("sum", "likelihood"), default="sum",
                    help="white-box canary score: summed updates, or the per-step likelihood ratio")
    at.add_argument("--clip", type=float, default=None, help="max grad norm (default 1.0)")
    at.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.1 white-box, 0.3 black-box)")
    at.add_argument("--delta", type=float, default=None, help="default 1e-5")
    at.add_argument("--beta", type=float, default=0.05, help="1 - joint confidence of the two bounds")
    at.add_argument("--model", default="mlp", metavar="NAME[:PRESET]",
                    help="the network the canaries train: 'mlp' (a small harness MLP, fast; default) or a "
                         "registered model, e.g. hafnet:dp or sfer_mdfae:dp (faces at its input size)")
    at.add_argument("--image-size", type=int, default=16, help="side the faces are resized to for the harness model")
    at.add_argument("--data-dir", type=Path, default=None,
                    help="a school's data directory (labels.csv + images); default: a small synthetic school")
    at.add_argument("--cache", type=Path, default=None, help="where the default synthetic school is built")
    at.add_argument("--randomness", choices=("secure", "reproducible"), default="secure",
                    help="where the trainer's draws come from: 'secure' (default), the CSPRNG a school trains with, "
                         "so the audit checks the mechanism that runs; 'reproducible', torch generators seeded "
                         "from --seed, to replay a result bit for bit. The canaries come from --seed either way")
    at.add_argument("--clipping", choices=("auto", "ghost", "per-sample"), default=None,
                    help="the clipping path of the audited trainer (default: the run's privacy.clipping, else auto)")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--threads", type=int, default=2)
    at.add_argument("--json", action="store_true")
    at.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    at.add_argument("--plot", type=Path, default=None,
                    help="white-box: write a PNG of the canary scores (included vs excluded, guess thresholds)")
    at.set_defaults(func=_canary_audit_command)
    _json_errors(at, "canary-audit")


# ------------------------------------------------------------------------------------------ audit
def _audit(args: argparse.Namespace) -> int:
    from privacy.audit import format_table, run_audit
    from privacy.policy import epsilon_problem

    def usage(message: str) -> int:   # bad input: one line (or with --json one object), no table, no verdict
        return print_usage_error("audit", message, args.json)

    if args.keys is None and not args.trust_run_keys:
        return usage("give --keys DIR (the ledger keys registered at enrollment, e.g. deploy/keys), or "
                     "--trust-run-keys to verify against keys stored in the run (a simulated run has no keyring)")
    if args.budget is not None and (problem := epsilon_problem(args.budget)) is not None:
        return usage(f"--budget {problem}")
    if args.anchors is not None and not args.anchors.is_dir():
        return usage(f"--anchors {args.anchors}: " + ("not a directory (give the server's anchors directory, "
                                                      "e.g. runs/anchors)" if args.anchors.exists() else "not found"))
    report = run_audit(args.paths, args.keys, every_entry=args.every_entry, budget_override=args.budget,
                       trust_run_keys=args.trust_run_keys, anchors_dir=args.anchors)
    if not report.rows and report.problems:   # nothing to audit: a missing path or keyring, a path with no ledger
        return usage(report.problems[0])
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(format_table(report))
    return report.exit_code


# ------------------------------------------------------------------------------------------ plan
def _plan(args: argparse.Namespace) -> int:
    from privacy.accounting import AccountingError
    from privacy.planner import format_plan, make_plan

    if args.points < 2:   # was quietly raised to 2: a 0 or negative typed by mistake printed a curve anyway
        return print_usage_error("plan", f"--points must be at least 2 (the first and the last round), got "
                                         f"{args.points}", args.json)
    try:
        plan = make_plan(args.epsilon, args.delta, args.rounds, args.local_epochs, args.students, args.batch,
                         accountant=args.accountant, max_points=args.points)
    except (AccountingError, ValueError) as exc:
        return print_usage_error("plan", str(exc), args.json)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


# ----------------------------------------------------------------------------- canary-audit (attack)
def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{path}: not found (a run directory holds its resolved config.yaml)")
    from shared_models.config import ConfigError, read_yaml_file
    from shared_models.wording import one_line

    try:   # the project's strict reader: no aliases, bounded size and nesting, UTF-8, a mapping
        return read_yaml_file(path)
    except ConfigError as exc:
        raise UsageError(one_line(exc)) from None


def _canary_audit_command(args: argparse.Namespace) -> int:
    try:
        return _canary_audit(args)
    except ValueError as exc:  # bad settings or data, phrased as one line
        return print_usage_error("canary-audit", str(exc), args.json)


def _positive(name: str, value, integer: bool = False):
    if value is None:
        return None
    ok = math.isfinite(value) and value > 0 and (not integer or value == int(value))
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise UsageError(f"--{name} must be {kind}, got {value}")
    return value


def _canary_audit(args: argparse.Namespace) -> int:
    cfg = _run_config(args.run_dir)
    _check_canary_flags(args)
    settings = _canary_settings(args, cfg)
    result, source = _run_canary_audit(args, settings)
    out = _canary_json(result, settings.white, source)
    out["model"] = args.model
    _write_canary_outputs(args, result, out, settings.white)
    if result.bound_above_claim:
        print("bound above claim: an empirical lower bound exceeds the claimed ε (a privacy bug)", file=sys.stderr)
        return 1
    return 0


#: Largest face side the canary harness resizes to: what a school's data may hold (data.image_size's maximum).
MAX_CANARY_IMAGE_SIZE = 512
#: Most canaries one audit takes (the documented audits use 8000-16000): black-box, each is a random image
#: held in float64 while it is drawn (100000 at 16x16: ~0.6 GB); 10^12 asked numpy for petabytes.
MAX_CANARIES = 100_000
#: Most canaries in one white-box run: every step builds a (frames x canaries-in-the-run) one-hot for the
#: probe and, on the per-sample path, a gradient of that size; at 10000 with every student sampled (2 frames
#: per canary, half of them included) that is ~0.4 GB each, about 1 GB a step.
MAX_CANARIES_PER_RUN = 10_000
#: Most memory the canaries of one audit may take (canary_memory_bytes): the count caps above hold at the
#: harness's 16x16 faces, but a registered model's input (64x64 for the cpu and dp presets, up to 224x224 for
#: paper) or --image-size 512 makes each canary 16-1000x bigger: 10^5 black-box canaries for hafnet:dp are
#: ~16 GB, at 224x224 ~200 GB. The documented audits need well under 1 GB.
MAX_CANARY_BYTES = 4 * 2**30


def _check_canary_flags(args: argparse.Namespace) -> None:
    """One-line errors for flags out of range, before anything is loaded."""
    for name, value, integer in (("epsilon", args.epsilon, False), ("delta", args.delta, False),
                                 ("canaries", args.canaries, True), ("runs", args.runs, True),
                                 ("epochs", args.epochs, True), ("batch", args.batch, True),
                                 ("frames-per-unit", args.frames_per_unit, True), ("clip", args.clip, False),
                                 ("lr", args.lr, False), ("beta", args.beta, False),
                                 ("image-size", args.image_size, True), ("threads", args.threads, True)):
        _positive(name, value, integer)
    if args.canaries is not None:
        _check_canary_count(args.canaries, args.runs, white=not args.black_box)
    if args.image_size > MAX_CANARY_IMAGE_SIZE:   # 10^5 asked torch for 27 TB: an internal error
        raise UsageError(f"--image-size must be at most {MAX_CANARY_IMAGE_SIZE}, got {args.image_size}")
    if args.seed < 0:   # numpy's own message named no flag
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir}: not a directory")


def _check_canary_count(canaries: int, runs: int, white: bool) -> None:
    """--canaries within what the audit can hold in memory (MAX_CANARIES, MAX_CANARIES_PER_RUN say why), and
    at least the two the bounds need (checked here so the school is not loaded first)."""
    if canaries < 2:
        raise UsageError(f"--canaries must be at least 2 (a guess needs one canary in and one out), got {canaries}")
    if canaries > MAX_CANARIES:
        raise UsageError(f"--canaries must be at most {MAX_CANARIES}, got {canaries}")
    if white:
        per_run = -(-canaries // min(runs, max(1, canaries // 2)))   # as the audit spreads them (ceiling)
        if per_run > MAX_CANARIES_PER_RUN:
            raise UsageError(f"--canaries {canaries} over --runs {runs} puts {per_run} canaries in a run; at most "
                             f"{MAX_CANARIES_PER_RUN} per run: give more --runs")


def canary_memory_bytes(canaries: int, runs: int, white: bool, image_size: int, frames: int) -> int:
    """About how much memory the canaries of an audit take (the school's own frames and the model not counted).
    Black-box: every canary is a random 3 x S x S image, drawn in float64 (8 bytes a value), kept in float32 (4)
    and, for the half included, copied into the training set (4 / 2). White-box, per run (the runs follow one
    another): the included half of the run's canaries add `frames` blank float32 frames each to the training set
    (4 / 2, and the set's copy of them, 4 / 2), and each step's probe holds a one-hot of those frames x the run's
    canaries and its gradient (2 x 4 bytes a value)."""
    pixels = 3 * image_size * image_size
    if not white:
        return canaries * pixels * (8 + 4 + 2)
    per_run = -(-canaries // min(runs, max(1, canaries // 2)))   # as the audit spreads them (ceiling)
    included_frames = per_run * frames // 2
    return included_frames * pixels * (4 + 4) + 2 * included_frames * per_run * 4


def _check_canary_memory(canaries: int, runs: int, white: bool, image_size: int, frames: int, model: str) -> None:
    """A one-line refusal, with the estimate, when the canaries alone would take more than MAX_CANARY_BYTES.
    `model`: --model ('mlp': the faces' size is --image-size; else the registered model's input size)."""
    need = canary_memory_bytes(canaries, runs, white, image_size, frames)
    if need > MAX_CANARY_BYTES:
        smaller = "a smaller --image-size" if model == "mlp" else f"a model with smaller inputs than {model}'s"
        raise UsageError(f"{canaries} canaries ({'white' if white else 'black'}-box) of {image_size}x{image_size} "
                         f"faces would take about {need / 2**30:.1f} GB for the canaries alone (at most "
                         f"{MAX_CANARY_BYTES / 2**30:g} GB): give fewer --canaries"
                         + (", more --runs" if white else "") + f" or {smaller}")


@dataclass(frozen=True)
class _CanarySettings:
    white: bool
    epsilon: float | None  # None: the no-DP control
    delta: float
    clip: float
    canaries: int
    frames: int
    lr: float
    clipping: str          # privacy.clipping of the audited trainer: auto | ghost | per-sample


def _canary_settings(args: argparse.Namespace, cfg: dict) -> _CanarySettings:
    """The audit's settings: a flag wins, then the run's config.yaml, then the mode's default."""

    def pick(flag, key, default):
        return flag if flag is not None else cfg.get(key, default)

    white = not args.black_box
    epsilon = None if args.no_dp else float(pick(args.epsilon, "privacy.target_epsilon", 4.0 if white else 8.0))
    delta = float(pick(args.delta, "privacy.delta", 1e-5))
    if not 0 < delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {delta}")
    if not 0 < args.beta < 1:
        raise UsageError(f"--beta must be in (0, 1), got {args.beta}")
    clip = float(pick(args.clip, "privacy.max_grad_norm", 1.0))
    canaries = args.canaries or (8000 if white else 500)
    frames = args.frames_per_unit or 2
    lr = float(args.lr or (0.1 if white else 0.3))
    clipping = str(pick(args.clipping, "privacy.clipping", "auto"))
    if clipping not in ("auto", "ghost", "per-sample"):
        raise UsageError(f"{Path(args.run_dir) / 'config.yaml'}: privacy.clipping must be auto, ghost or per-sample, "
                         f"got {clipping!r}")
    return _CanarySettings(white=white, epsilon=epsilon, delta=delta, clip=clip, canaries=canaries, frames=frames,
                           lr=lr, clipping=clipping)


def _run_canary_audit(args: argparse.Namespace, settings: _CanarySettings):
    """Load the school, run the white-box or black-box audit; returns the result and the data's source."""
    import warnings

    import torch

    from privacy.canary_audit import run_black_box_audit, run_white_box_audit, tiny_model_builder

    white, canaries, frames = settings.white, settings.canaries, settings.frames
    epsilon, delta, clip, lr = settings.epsilon, settings.delta, settings.clip, settings.lr
    torch.set_num_threads(args.threads)
    # Opacus' note on inputs without gradients, and q = 1 when every student is sampled: both expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="units_per_batch .* exceeds")
    builder = _audit_model_builder(args)   # may set args.image_size to the model's input size
    # checked at the faces' final size, before the school is loaded
    _check_canary_memory(canaries, args.runs, white, args.image_size, frames, args.model)
    x, y, units, source = _school_tensors(args, "student")
    say = _progress_printer()
    print(f"data: {source}: {len(y)} frames, {len(set(units))} students, {args.image_size}x{args.image_size}; "
          f"{canaries} canaries ({'white-box' if white else 'black-box'}); trainer randomness: {args.randomness}",
          flush=True)
    if white:
        # the canary frames pass through the model too: a narrow one keeps per-frame gradients cheap
        result = run_white_box_audit(x, y, units, builder or tiny_model_builder(tuple(x.shape[1:]), hidden=16),
                                     canaries=canaries,
                                     runs=min(args.runs, canaries // 2), epsilon=epsilon, delta=delta,
                                     epochs=args.epochs, units_per_batch=args.batch, frames_per_canary=frames,
                                     max_grad_norm=clip, lr=lr, beta=args.beta, score=args.score, seed=args.seed,
                                     randomness=args.randomness, clipping=settings.clipping, progress=say)
    else:
        result = run_black_box_audit(x, y, units, builder or tiny_model_builder(tuple(x.shape[1:])), canaries=canaries,
                                     epsilon=epsilon, delta=delta, epochs=args.epochs,
                                     units_per_batch=args.batch or 16, frames_per_unit=frames, max_grad_norm=clip,
                                     lr=lr, beta=args.beta, seed=args.seed, randomness=args.randomness,
                                     clipping=settings.clipping, progress=say)
    return result, source


def _progress_printer():
    """The audit's progress lines, indented; a calibration line said again for the same setting (each of
    the runs recalibrates σ) is printed once."""
    said: set[str] = set()

    def say(line: str) -> None:
        if line.strip().startswith("calibrating σ"):
            if line.strip() in said:
                return
            said.add(line.strip())
        print("  " + line, flush=True)
    return say


def _audit_model_builder(args: argparse.Namespace):
    """None for the harness MLP; else a builder of the registered model (FER7 outputs) at its input size."""
    if args.model == "mlp":
        return None
    from shared_models.models import registry

    name, _, preset = args.model.partition(":")
    if name not in registry.available():
        raise UsageError(f"--model: unknown model {name!r} (mlp, {', '.join(registry.available())})")
    preset = preset or "dp"
    if preset not in registry.presets(name):
        raise UsageError(f"--model: {name} has no preset {preset!r} ({', '.join(registry.presets(name))})")
    args.image_size = int(registry.build(name, num_classes=7, preset=preset).input_size)
    return lambda: registry.build(name, num_classes=7, preset=preset)


def _canary_json(result, white: bool, source: str) -> dict:
    """The result's JSON with the audit kind, the command that ran it and the data it used."""
    out = result.to_json()
    argv = sys.argv[1:]
    out["audit"] = "white-box" if white else "black-box"
    out["command"] = ("fedfer " + " ".join(argv)) if argv[:1] == ["privacy"] else "fedfer privacy canary-audit (in-process)"
    out["data"] = source
    return out


def _write_canary_outputs(args: argparse.Namespace, result, out: dict, white: bool) -> None:
    """--out JSON, --plot PNG (white-box only), then the JSON or the one-screen summary on stdout."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.plot and white:
        from privacy.canary_audit import save_score_plot

        args.plot.parent.mkdir(parents=True, exist_ok=True)
        save_score_plot(result, args.plot)
        print(f"score histogram: {args.plot}")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(format_audit(out))


def format_audit(out: dict) -> str:
    """The one-screen summary of a canary audit's JSON."""
    claimed = out["claimed_epsilon"]
    claim = "∞ (DP off)" if claimed is None else f"{claimed:.3f}"
    lines = [f"{out['audit']} canary audit: claimed ε {claim} at δ {out['delta']:g} (σ {out['noise_multiplier']:.4f}, "
             f"q {out['sample_rate']:.4g}, {out['steps']} steps)",
             f"canaries {out['canaries']} ({out['included']} included); trainer randomness: {out['randomness']}"
             + (" (the CSPRNG a school trains with)" if out["randomness"] == "secure"
                else " (seeded torch generators: a replay, not the production draws)")]
    for name, label in (("steinke", "Steinke et al. 2023"), ("fdp", "f-DP (Mahloujifar et al. 2025)")):
        b = out["bounds"][name]
        eps = "∞" if b["epsilon"] is None else f"{b['epsilon']:.3f}"
        ratio = "" if claimed is None or b["epsilon"] is None else f"  ({b['epsilon'] / claimed:.0%} of the claim)"
        lines.append(f"  {label:32s} ε ≥ {eps}{ratio}  [k={b['k']} each side: {b['correct']}/{b['guesses']} correct]")
    lines.append(f"joint confidence {out['bounds']['fdp']['confidence']:.0%}; {out['seconds']:.0f} s; verdict: "
                 + ("BOUND ABOVE CLAIM" if out["bound_above_claim"] else "consistent with the claim"))
    return "\n".join(lines)


def _school_tensors(args: argparse.Namespace, unit: str):
    """Faces of one school as model inputs (N, 3, S, S) in [-1, 1], labels, unit ids."""
    import torch

    from shared_models.datasets.school_folder import load_school

    data_dir = args.data_dir
    if data_dir is None:
        from simulations.synth import SynthParams, ensure_school

        cache = args.cache or Path.home() / ".cache" / "fedfer" / "attack-synth"
        params = SynthParams(schools=1, students_per_school=24, frames_per_student=8, image_size=32, seed=7,
                             public_students=4)
        data_dir = ensure_school(cache, params, 0)
    school = load_school(data_dir)
    if len(school) == 0:
        raise UsageError(f"{data_dir}: no usable images")
    x = torch.from_numpy(school.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = torch.nn.functional.interpolate(x, size=(args.image_size, args.image_size), mode="area")
    y = torch.from_numpy(school.labels).long()
    return x, y, (list(school.student_ids) if unit == "student" else None), str(data_dir)
