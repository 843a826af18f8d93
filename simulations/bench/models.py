"""Training speed and memory of the model zoo, plain and under Opacus DP-SGD.

    python -m simulations.bench.models [--models hafnet,sfer_mdfae] [--preset cpu[,dp]] [--threads 1,2]
        [--batch 32] [--steps 8] [--extras] [--merge] [--out benchmarks/models.json]

Every configuration runs in a fresh subprocess (clean thread setting, clean allocator, its own peak
RSS). A step is forward + full per-sample loss (`registry.per_sample_loss`) + backward + optimizer
step on a random batch in [-1, 1]: images (B, 3, S, S), or clips (B, 3, T, S, S) for a clip model
(preset `clip_frames` T > 0; samples/s then counts clips). Modes:

  plain        SGD, no DP
  dp-bk        book-keeping with per-layer ghost norms (privacy/student_clipping.py) + Opacus'
               DPOptimizerFastGradientClipping (noise; student_clipping.clipped_sum_optimizer) -- what
               the client uses (privacy.clipping: auto)
  dp-hooks     Opacus GradSampleModule (hooks) + DPOptimizer (clip + noise) -- privacy.clipping: per-sample
  dp-bk-ghost / dp-bk-direct  dp-bk with every Linear/Conv2d on the ghost rule / the direct rule (--extras)
  dp-bk-onedraw  dp-bk with one Gaussian draw per noise coordinate instead of Opacus' secure_mode four
               (every DP mode draws its noise in secure_mode, as the client does: privacy/engine.py SECURE_NOISE)
  dp-bk-csprng dp-bk with the noise from the AES-256-CTR stream (privacy/secure_random.py) instead of torch's
               generator: what the client runs since the CSPRNG (the other modes keep torch's generator, so
               earlier results stay comparable); the ratio to dp-bk is the CSPRNG's cost
  dp-ghost     Opacus fast gradient / ghost clipping (GradSampleModuleFastGradientClipping, two backward
               passes, norms instead of stored per-sample gradients where Opacus has a norm sampler)
  dp-functorch GradSampleModule(force_functorch=True)
  dp-ew        Opacus ExpandedWeights mode
  dp-stock     dp-hooks with Opacus' stock samplers instead of fedfer's (dp_layers): grouped convs
               through nn.Conv2d's sampler, PReLU through functorch -- shows what dp_layers buys
  dp-hooks-cl  dp-hooks with channels-last tensors; also checks the per-sample gradients against the
               contiguous run (Opacus' conv sampler assumes NCHW strides)
  dp-hooks-malloc  dp-hooks with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_ /
               MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_): the per-sample gradient buffers are then reused
               instead of being mmap'd and page-faulted afresh every step

`--extras` adds the other DP modes, channels-last and a batch-size sweep (HAFNet only). Rates are
samples per second from the median step, by wall clock and per CPU-second of the process (the machine
is shared; CPU time is the steadier number). Peak memory is the process' peak RSS (getrusage) and its
growth during training over the RSS after building the model.

`--merge` keeps the rows of the existing output file that this run does not measure again (other models
or presets) and tags every row with the command and time that measured it, so one file holds the whole
zoo although its rows come from several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from simulations.bench.results import command_line, write_result

# ------------------------------------------------------------------------------------------------
# worker: one configuration, in its own process


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(cfg: dict) -> dict:
    """Measure one configuration (run in its own process by `_run`): build, pick the step, time it."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(cfg["threads"])
    from shared_models.models import registry

    torch.manual_seed(0)
    model = registry.build(cfg["model"], 7, cfg["preset"])
    mode, batch = cfg["mode"], cfg["batch"]
    size = model.input_size
    g = torch.Generator().manual_seed(1)
    frames = registry.clip_frames(model)   # a clip model reads (B, 3, T, S, S)
    x = torch.rand(batch, 3, *((frames,) if frames else ()), size, size, generator=g) * 2 - 1
    if frames and getattr(model, "reads_landmarks", False):   # MAFNet: with its landmark row, as schools train it
        from shared_models.models.mafnet import pack_landmarks

        x = pack_landmarks(x, torch.rand(batch, frames, 68, 2, generator=g) * size, size)
    y = torch.randint(0, 7, (batch,), generator=g)
    if mode == "dp-hooks-cl" or mode == "plain-cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    result: dict = {}
    step = _training_step(mode, model, x, y, result)
    result.update(_time_steps(step, cfg["steps"], cfg["warmup"], batch))
    return result


def _training_step(mode: str, model, x, y, result: dict) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """One optimizer step of `mode` on the fixed batch (x, y); checks a mode makes go into `result`."""
    import torch

    from shared_models.models import registry

    from privacy.engine import SECURE_NOISE

    # the noise in the client's form (Opacus' secure_mode); `dp-bk-onedraw`: one Gaussian draw per coordinate;
    # `dp-bk-csprng`: drawn from the client's CSPRNG stream (privacy/noise.py CSPRNGNoise), the rest torch's generator
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(x),
              secure_mode=SECURE_NOISE and mode != "dp-bk-onedraw")
    if mode == "dp-bk-csprng":
        from privacy.secure_random import SecureRandom

        dp["generator"] = SecureRandom()
    if mode in ("dp-bk-onedraw", "dp-bk-csprng"):
        mode = "dp-bk"
    if mode.startswith("plain"):
        net, opt = model, torch.optim.SGD(model.parameters(), lr=0.01)
    elif mode in ("dp-hooks", "dp-functorch", "dp-stock", "dp-hooks-cl", "dp-hooks-malloc"):
        net, opt = _hooks_module(mode, model, dp)
        if mode == "dp-hooks-cl":
            result["grad_sample_max_rel_error_vs_contiguous"] = _channels_last_grad_error(net, opt, model, x, y)
    elif mode == "dp-ghost":
        return _ghost_clipping_step(model, x, y, dp)
    elif mode.startswith("dp-bk"):
        return _book_keeping_step(model, x, y, dp, {"dp-bk": "mixed"}.get(mode, mode[len("dp-bk-"):]))
    elif mode == "dp-ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights
        from opacus.optimizers import DPOptimizer

        net = GradSampleModuleExpandedWeights(model)
        opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), **dp)
    else:
        raise ValueError(f"unknown mode {mode!r}")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        registry.per_sample_loss(net, net(x), y).mean().backward()
        opt.step()
    return step


def _hooks_module(mode: str, model, dp: dict):  # type: ignore[no-untyped-def]
    """Opacus' hook-based GradSampleModule (functorch-forced for dp-functorch) and its DPOptimizer."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if mode == "dp-stock":  # turn fedfer's layers back into the torch classes they extend
        from shared_models.models import dp_layers

        for m in model.modules():
            if type(m) is dp_layers.GroupedConv2d:
                m.__class__ = torch.nn.Conv2d
            elif type(m) is dp_layers.PReLU:
                m.__class__ = torch.nn.PReLU
    net = GradSampleModule(model, force_functorch=mode == "dp-functorch")
    return net, DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.01), **dp)


def _channels_last_grad_error(net, opt, model, x, y) -> float:  # type: ignore[no-untyped-def]
    """Are the per-sample gradients still right with channels-last input? Opacus' conv sampler assumes
    NCHW strides, so compare with the same batch made contiguous (largest relative error)."""
    from shared_models.models import registry

    net.zero_grad(set_to_none=True)
    registry.per_sample_loss(net, net(x), y).mean().backward()
    got = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    opt.zero_grad(set_to_none=True)
    xc = x.contiguous()
    registry.per_sample_loss(net, net(xc), y).mean().backward()
    worst = 0.0
    for n, p in model.named_parameters():
        ref = p.grad_sample
        worst = max(worst, float((got[n] - ref).norm() / ref.norm().clamp_min(1e-12)))
    opt.zero_grad(set_to_none=True)
    return worst


def _ghost_clipping_step(model, x, y, dp: dict) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """Opacus fast gradient (ghost) clipping: its own module, optimizer and loss wrapper."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from shared_models.models import registry

    net = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(net.parameters(), lr=0.01), **dp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        DPTensorFastGradientClipping(net, opt, registry.per_sample_loss(net, net(x), y)).backward()
        opt.step()
    return step


def _book_keeping_step(model, x, y, dp: dict, policy: str) -> Callable[[], None]:  # type: ignore[no-untyped-def]
    """privacy/student_clipping.py, every frame its own unit (as the other modes), Opacus' noise and step."""
    import torch

    from privacy.student_clipping import StudentClipper, clipped_sum_optimizer
    from shared_models.models import registry

    clipper = StudentClipper(model, layer_policy=policy)
    opt = clipped_sum_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), **dp)
    rows = torch.arange(len(x))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with clipper.capture():
            losses = registry.per_sample_loss(model, model(x), y)
        clipper.clip_and_sum(losses, rows, len(x), dp["max_grad_norm"])
        opt.step()
    return step


def _time_steps(step: Callable[[], None], steps: int, warmup: int, batch: int) -> dict:
    """Median wall and CPU time per step after `warmup` steps, peak RSS, RSS growth and page faults."""
    import resource

    rss_before = _rss_mb()
    walls, cpus, faults = [], [], []
    for i in range(steps + warmup):
        w, c = time.perf_counter(), time.process_time()
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        if i >= warmup:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {
        "step_ms_wall": round(wall * 1e3, 1), "step_ms_cpu": round(cpu * 1e3, 1),
        "samples_per_s_wall": round(batch / wall, 1), "samples_per_s_cpu": round(batch / cpu, 1),
        "peak_rss_mb": round(peak, 1), "train_rss_growth_mb": round(peak - rss_before, 1),
        "page_faults_per_step": int(statistics.median(faults)),
    }


def _run(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "simulations.bench.models", "--worker", json.dumps(cfg)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    if cfg["mode"] == "dp-hooks-malloc":
        env.update(MALLOC_MMAP_THRESHOLD_=str(2**28), MALLOC_TRIM_THRESHOLD_=str(2**30), MALLOC_TOP_PAD_=str(2**26))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        return {**cfg, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return {**cfg, "ok": False, "error": lines[-1][:300] if lines else f"exit {proc.returncode}"}
    return {**cfg, "ok": True, **json.loads(proc.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> list[dict]:
    plan = []
    for preset in args.preset.split(","):
        plan += _plan_preset(args, dict(preset=preset, steps=args.steps, warmup=2))
    return plan


def _plan_preset(args: argparse.Namespace, base: dict) -> list[dict]:
    plan = []
    for model in args.models.split(","):
        for batch in (int(b) for b in str(args.batch).split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                modes = args.modes.split(",")
                if args.extras:
                    modes += ["dp-bk-ghost", "dp-bk-direct", "dp-hooks-malloc", "dp-stock", "dp-ghost",
                              "dp-functorch", "dp-ew", "dp-hooks-cl"]
                plan += [dict(base, model=model, threads=threads, batch=batch, mode=m) for m in modes]
        if args.extras and model == "hafnet":
            for batch in (16, 64):
                plan += [dict(base, model=model, threads=1, mode=m, batch=batch) for m in ("plain", "dp-bk", "dp-hooks")]
    return plan


_KEY = ("model", "preset", "mode", "threads", "batch")


def _aggregate(rows: list[dict]) -> list[dict]:
    """One row per configuration: the median of its repeats, with the repeats' rates and memory kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in _KEY), []).append(r)
    out = []
    for reps in groups.values():
        ok = [r for r in reps if r["ok"]]
        if not ok:
            out.append(reps[0])
            continue
        row = dict(ok[0])
        for field in ("step_ms_wall", "step_ms_cpu", "samples_per_s_wall", "samples_per_s_cpu", "peak_rss_mb",
                      "train_rss_growth_mb", "page_faults_per_step"):
            row[field] = statistics.median(r[field] for r in ok)
        row["repeats"] = len(ok)
        row["samples_per_s_cpu_repeats"] = [r["samples_per_s_cpu"] for r in ok]
        out.append(row)
    return out


def _rate(row: dict) -> float:
    """The rate used for DP/plain ratios: per CPU-second with one thread (steady on a shared machine),
    wall clock with more (CPU time then counts every thread)."""
    return row["samples_per_s_cpu"] if row["threads"] == 1 else row["samples_per_s_wall"]


def _table(rows: list[dict]) -> str:
    head = (f"{'model':<13} {'preset':<6} {'mode':<13} {'thr':>3} {'batch':>5} {'samples/s':>10} "
            f"{'(per cpu-s)':>11} {'vs plain':>8} {'peak MB':>8} {'+train MB':>9} {'faults':>7}  note")
    out = [head, "-" * len(head)]
    plain = {(r["model"], r["preset"], r["threads"], r["batch"]): r for r in rows if r["mode"] == "plain" and r["ok"]}
    for r in rows:
        if not r["ok"]:
            out.append(f"{r['model']:<13} {r['preset']:<6} {r['mode']:<13} {r['threads']:>3} {r['batch']:>5}  "
                       f"failed: {r['error']}")
            continue
        p = plain.get((r["model"], r["preset"], r["threads"], r["batch"]))
        ratio = f"{_rate(p) / _rate(r):.2f}x" if p and r["mode"] != "plain" else ""
        note = ""
        if "grad_sample_max_rel_error_vs_contiguous" in r:
            err = r["grad_sample_max_rel_error_vs_contiguous"]
            note = f"per-sample grads {'WRONG' if err > 1e-4 else 'ok'} (rel err {err:.1e})"
        out.append(f"{r['model']:<13} {r['preset']:<6} {r['mode']:<13} {r['threads']:>3} {r['batch']:>5} "
                   f"{r['samples_per_s_wall']:>10.1f} {r['samples_per_s_cpu']:>11.1f} {ratio:>8} "
                   f"{r['peak_rss_mb']:>8.0f} {r['train_rss_growth_mb']:>9.0f} {r['page_faults_per_step']:>7}  {note}")
    return "\n".join(out)


def _summary(rows: list[dict]) -> dict:
    """DP vs plain per model, threads and batch for every DP mode: the ratio within each repeat (plain and
    DP measured in the same pass, minutes apart at most), its median and spread, and the memory ratios."""
    summary = {}
    plain = {tuple(r[k] for k in _KEY if k != "mode") + (r.get("repeat", 0),): r
             for r in rows if r["ok"] and r["mode"] == "plain"}
    by_config: dict[str, list[tuple[dict, dict]]] = {}
    for r in rows:
        p = plain.get(tuple(r[k] for k in _KEY if k != "mode") + (r.get("repeat", 0),))
        if r["ok"] and r["mode"].startswith("dp") and p:
            key = f"{r['model']}-{r['preset']} {r['mode']} threads={r['threads']} batch={r['batch']}"
            by_config.setdefault(key, []).append((p, r))
    for key, pairs in by_config.items():
        ratios = sorted(_rate(p) / _rate(r) for p, r in pairs)
        mem = sorted(r["peak_rss_mb"] / p["peak_rss_mb"] for p, r in pairs)
        growth = sorted(r["train_rss_growth_mb"] / max(p["train_rss_growth_mb"], 1.0) for p, r in pairs)
        summary[key] = {
            "plain_samples_per_s_cpu": statistics.median(p["samples_per_s_cpu"] for p, _ in pairs),
            "dp_samples_per_s_cpu": statistics.median(r["samples_per_s_cpu"] for _, r in pairs),
            "dp_slowdown": round(statistics.median(ratios), 2),
            "dp_slowdown_min_max": [round(ratios[0], 2), round(ratios[-1], 2)],
            "repeats": len(pairs),
            "dp_slowdown_measured_by": "cpu time" if pairs[0][1]["threads"] == 1 else "wall clock",
            "peak_rss_ratio": round(statistics.median(mem), 2),
            "train_rss_growth_ratio": round(statistics.median(growth), 2),
        }
    return summary


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="hafnet,sfer_mdfae")
    parser.add_argument("--preset", default="cpu", help="preset(s), comma-separated, e.g. cpu,dp")
    parser.add_argument("--merge", action="store_true",
                        help="keep the output file's rows for configurations this run does not measure")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch", default="32", help="batch size(s), comma-separated")
    parser.add_argument("--modes", default="plain,dp-bk,dp-hooks",
                        help="modes (see the module docstring); ratios need plain among them")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over every configuration (each in a fresh process); medians and spread")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--extras", action="store_true",
                        help="also other Opacus modes, channels-last and a batch sweep (HAFNet)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    parser.add_argument("--out", default="benchmarks/models.json")
    parser.add_argument("--rerender", default=None, metavar="JSON",
                        help="rebuild the table and summary of an earlier output from its stored results "
                             "(no measuring), e.g. after a change to how ratios are shown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _rerender(source: str, out: str) -> None:
    """Rebuild the table and summary of an earlier result file from its stored rows (no measuring)."""
    report = json.loads(Path(source).read_text())
    report.pop("summary_dp_hooks", None)
    for r in report["results"]:
        r.setdefault("page_faults_per_step", -1)
    table = _table(_aggregate(report["results"]))
    report["summary_dp_vs_plain"] = _summary(report["results"])
    report["table"] = table.splitlines()
    report["rerendered"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(table)


def _merge(path: Path, rows: list[dict], created: str, command: str) -> tuple[list[dict], list[dict]]:
    """The earlier file's rows this run did not measure again, then this run's; every row tagged with the
    command and time that measured it. Returns (rows, the earlier runs' command/time/machine/settings)."""
    for r in rows:
        r.update(measured_by=command, measured_at=created)
    if not path.exists():
        return rows, []
    old = json.loads(path.read_text())
    earlier = list(old.get("earlier_runs", []))
    earlier.append({k: old.get(k) for k in ("command", "created", "machine", "settings", "notes") if k in old})
    key = ("model", "preset", "mode", "threads", "batch")
    fresh = {tuple(r[k] for k in key) for r in rows}
    kept = []
    for r in old.get("results", []):
        if tuple(r.get(k) for k in key) not in fresh:
            r.setdefault("measured_by", old.get("command"))
            r.setdefault("measured_at", old.get("created"))
            r.setdefault("page_faults_per_step", -1)
            kept.append(r)
    return kept + rows, earlier


def _measure_all(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Run every planned configuration in its own process, print the table and write the result file."""
    import opacus
    import torch

    plan = _plan(args)
    load_start = _load()
    t0 = time.perf_counter()
    rows = []
    for repeat in range(args.repeats):   # passes, so each DP row has a plain row measured beside it
        for cfg in plan:
            row = dict(_run(cfg, args.timeout), repeat=repeat)
            rows.append(row)
            print(f"  [{repeat}] {row['model']} {row['mode']} threads={row['threads']} batch={row['batch']}: "
                  + (f"{row['samples_per_s_cpu']} samples/cpu-s" if row["ok"] else f"failed ({row['error']})"),
                  file=sys.stderr, flush=True)
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    earlier: list[dict] = []
    if args.merge:
        rows, earlier = _merge(Path(args.out), rows, created, command_line("simulations.bench.models", argv))
    table = _table(_aggregate(rows))
    print(table)
    summary = _summary(rows)
    report = {
        "created": created,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "opacus": opacus.__version__, "load_average_start": [round(v, 2) for v in load_start],
                    "load_average_end": [round(v, 2) for v in _load()]},
        "settings": {"preset": args.preset, "batch": args.batch, "steps": args.steps, "warmup": 2,
                     "repeats": args.repeats, "unit": "image (each frame its own clipping row)",
                     "noise_multiplier": 1.0, "max_grad_norm": 1.0, "optimizer": "SGD lr 0.01"},
        "summary_dp_vs_plain": summary,
        "results": rows,
        "table": table.splitlines(),
        **({"notes": earlier[-1]["notes"]} if earlier and earlier[-1].get("notes") else {}),
        **({"earlier_runs": earlier} if earlier else {}),
    }
    out = write_result(args.out, report, module="simulations.bench.models", argv=argv)
    print(f"\nwrote {out} (load average {load_start[0]:.1f} -> {_load()[0]:.1f} on {os.cpu_count()} cpus)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
    elif args.rerender is not None:
        _rerender(args.rerender, args.out)
    else:
        _measure_all(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
