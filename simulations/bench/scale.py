"""Many schools on one machine: 10, 100 and 1,000 simulated schools at 10 % per round.

    python -m simulations.bench.scale [--schools 10,100,1000] [--rounds 3] [--students 300] [--size 32]
                                      [--preset dp] [--out benchmarks/scale.json]

Each case is the command a user types, `fedfer simulate federation.schools=N federation.fraction_train=0.1
data.generate=on-demand …` (own run and data folders in a scratch directory), with a small model (HAFNet
`dp`, ~33 k parameters) and small images (32 px) to keep 1,000 schools feasible on two cores; the schools
are generated when first sampled (only sampled schools cost time). Measured per case:

- generation: the generator service's seconds per school built (fedfer simulate's closing line) over the
  images of the schools it built → seconds per image; beside it, in this process, one school drawn with the
  demo's data settings (64 px, 2 frames per student) → the demo build's seconds per image;
- round seconds (metrics.jsonl `timing.round_seconds`; round 1 also asks every node its role);
- train exchange ÷ (summed school compute ÷ slots): the server's `train_exchange_s` against the seconds each
  sampled school spent on its round (its own `schools/<id>/round-timing.jsonl`, never sent: data wait + decode +
  DP training + ledger) plus the evaluation node's compute for the previous round's model (pipelined into
  the same exchange), divided by the simulation's actor slots (flower.log "ActorPool with: N actors");
- peak resident memory of the whole process tree (fedfer simulate, SuperLink, Ray and its actors), sampled
  every 0.5 s from /proc: the sum of RSS (shared pages counted in every process: an upper bound) and of PSS;
- server-side bytes written per round: the run directory without the schools' own state (`schools/`) and
  Flower's home (`.flower/`), by top-level entry.

Prints a table and writes benchmarks/scale.json (with the command). Timing numbers belong under the
machine's timing lock; the machine is shared, so the load average is recorded with every case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from server.processes import process_tree
from simulations import synth
from simulations.bench.results import write_result

SAMPLE_S = 0.5


def _proc_kb(pid: int, field: str, source: str) -> int:
    try:
        with open(f"/proc/{pid}/{source}", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Samples the summed RSS and PSS (kB) of a process and all its descendants until stopped."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.root_pid)
            self.peak_rss_kb = max(self.peak_rss_kb, sum(_proc_kb(p, "VmRSS:", "status") for p in pids))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_proc_kb(p, "Pss:", "smaps_rollup") for p in pids))
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(SAMPLE_S)


def demo_seconds_per_image(scratch: Path, students: int = 400) -> dict[str, float]:
    """One school drawn with the demo's data settings (defaults.yaml: 64 px, 2 frames per student; the
    demo's 4,000-student schools cost the same per image as this smaller one)."""
    params = synth.SynthParams(schools=1, students_per_school=students, frames_per_student=2, image_size=64,
                               clips_per_student=0, school_size_spread=0)
    started = time.perf_counter()
    synth.ensure_school(scratch / "demo-school", params, 0)
    seconds = time.perf_counter() - started
    images = synth.school_image_count(params, 0)
    return {"images": images, "seconds": round(seconds, 2), "s_per_image": seconds / images}


def case_overrides(schools: int, args: argparse.Namespace, work: Path) -> list[str]:
    return [f"federation.schools={schools}", f"federation.fraction_train={args.fraction}",
            f"federation.rounds={args.rounds}", "federation.min_train_schools=1", "data.generate=on-demand",
            f"data.students_per_school={args.students}", "data.frames_per_student=2", f"data.image_size={args.size}",
            "data.public_students=40", "data.public_frames=7", "data.public_train_students=0",
            "data.heldout_students=0", "evaluation.benchmarks=synthetic-fer2013", "evaluation.bootstrap=100",
            f"model.preset={args.preset}", "run.name=scale", f"run.root={work / 'runs'}", f"data.root={work / 'data'}"]


def _school_rounds(run: Path) -> dict[int, list[dict[str, float]]]:
    """round -> every sampled school's own timing line for it."""
    out: dict[int, list[dict[str, float]]] = {}
    for log in (run / "schools").glob("*/round-timing.jsonl"):
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("status") == "ok":   # a trained round: data wait + decode + DP training + ledger
                out.setdefault(int(entry["round"]), []).append(
                    {"data_s": float(entry["seconds"].get("data", 0.0)),
                     "round_s": float(entry["done_unix"]) - float(entry["received_unix"])})
    return out


def _server_bytes(run: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in run.rglob("*"):
        top = path.relative_to(run).parts[0]
        if path.is_file() and top not in ("schools", ".flower"):
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    return dict(sorted(sizes.items()))


def _failures(run: Path) -> dict[str, int]:
    """How many replies of each kind the server did not accept (events.jsonl), by kind and short reason."""
    counts: dict[str, int] = {}
    path = run / "events.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        event = json.loads(line)
        key = f"{event.get('event', event.get('kind', '?'))}: {str(event.get('reason', ''))[:120]}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _generated(output: str) -> dict[str, Any]:
    """From fedfer simulate's closing line `generated K school(s) on demand: N images in S s of generation`."""
    match = re.search(r"generated (\d+) school\(s\) on demand: ([\d,]+) images in ([\d.]+) s", output)
    if not match:
        return {"schools": 0, "images": 0, "seconds": float("nan"), "s_per_image": float("nan")}
    schools, images, seconds = int(match.group(1)), int(match.group(2).replace(",", "")), float(match.group(3))
    return {"schools": schools, "images": images, "seconds": seconds, "s_per_image": seconds / max(images, 1)}


def _rounds(run: Path, slots: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    schools = _school_rounds(run)
    # pipelined evaluation: round r-1's model is scored by the evaluation node inside round r's train
    # exchange, so its compute takes a slot there too
    evaluated_during = {int(r["evaluated_in_round"]): float(r["timing"].get("evaluate_compute_s", 0.0))
                        for r in rows if r.get("evaluated_in_round")}
    out = []
    for row in rows:
        timing = row.get("timing", {})
        mine = schools.get(int(row["round"]), [])
        compute = sum(e["round_s"] for e in mine) + evaluated_during.get(int(row["round"]), 0.0)
        wait = sum(e["data_s"] for e in mine)
        exchange = float(timing.get("train_exchange_s", float("nan")))
        out.append({"round": row["round"], "sampled": len(row["train"]),
                    "ok": sum(1 for o in row["train"].values() if o.get("status") == "ok"),
                    "round_s": round(float(timing["round_seconds"]), 2), "train_exchange_s": round(exchange, 2),
                    "school_compute_sum_s": round(compute, 2), "school_data_wait_sum_s": round(wait, 2),
                    "exchange_over_compute_per_slot": round(exchange / (compute / slots), 3) if compute else None})
    return out


def run_case(schools: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    work = scratch / f"n{schools}"
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "fedfer", "simulate", *case_overrides(schools, args, work)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, env=env)
    with TreeMemory(proc.pid) as memory:
        output, _ = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{schools} schools: fedfer simulate exited {proc.returncode}:\n{output[-3000:]}")
    run = work / "runs" / "scale"
    log = (run / "flower.log").read_text(errors="replace")
    slots = int(m.group(1)) if (m := re.search(r"ActorPool with: (\d+) actors", log)) else 2
    rounds = _rounds(run, slots)
    server = _server_bytes(run)
    later = rounds[1:] or rounds
    return {"schools": schools, "sampled_per_round": rounds[0]["sampled"], "wall_s": round(wall, 1),
            "load_avg_1min_at_start": round(load, 2), "slots": slots, "generation": _generated(output),
            "round1_s": rounds[0]["round_s"], "round_s_median_after_1": statistics.median(r["round_s"] for r in later),
            "exchange_ratio_median": statistics.median(r["exchange_over_compute_per_slot"] for r in rounds
                                                       if r["exchange_over_compute_per_slot"] is not None),
            "peak_rss_gb": round(memory.peak_rss_kb / 2**20, 2), "peak_pss_gb": round(memory.peak_pss_kb / 2**20, 2),
            "peak_processes": memory.peak_processes,
            "server_bytes_per_round": round(sum(server.values()) / len(rounds)), "server_bytes": server,
            "not_accepted": _failures(run),
            "rounds": rounds}


def _table(cases: list[dict[str, Any]], demo: dict[str, float]) -> str:
    lines = [f"demo build (64 px, 2 frames/student): {1000 * demo['s_per_image']:.2f} ms per image",
             f"{'schools':>7} {'sampled':>7} {'gen ms/img':>10} {'×demo':>6} {'round1 s':>8} {'round s':>8} "
             f"{'exch/compute':>12} {'peak RSS GB':>11} {'PSS GB':>7} {'server B/round':>14}"]
    for c in cases:
        gen = c["generation"]["s_per_image"]
        lines.append(f"{c['schools']:>7} {c['sampled_per_round']:>7} {1000 * gen:>10.2f} {_over_demo(c, demo):>6.2f} "
                     f"{c['round1_s']:>8.1f} {c['round_s_median_after_1']:>8.1f} {c['exchange_ratio_median']:>12.3f} "
                     f"{c['peak_rss_gb']:>11.2f} {c['peak_pss_gb']:>7.2f} {c['server_bytes_per_round']:>14,}")
    return "\n".join(lines)


def _over_demo(case: dict[str, Any], demo: dict[str, float]) -> float:
    """Generation per image ÷ the demo build's, the demo drawn in the same run as the case (same load)."""
    own = case.get("demo_s_per_image_same_run") or demo["s_per_image"]
    return case["generation"]["s_per_image"] / own


def _targets(cases: list[dict[str, Any]], demo: dict[str, float]) -> dict[str, Any]:
    by = {c["sampled_per_round"]: c for c in cases}
    out: dict[str, Any] = {"peak_rss_gb_max": max(c["peak_rss_gb"] for c in cases),
                           "generation_over_demo_max": round(max(_over_demo(c, demo) for c in cases), 3)}
    if 10 in by and 100 in by:
        out["round_s_100_over_10_sampled"] = round(by[100]["round_s_median_after_1"] / by[10]["round_s_median_after_1"], 2)
        # round 1 against round 1 (both include the role query to every node and the first generation)
        out["round1_s_100_over_10_sampled"] = round(by[100]["round1_s"] / by[10]["round1_s"], 2)
    if 100 in by:
        out["exchange_ratio_at_100_sampled"] = by[100]["exchange_ratio_median"]
    return out


def _without_out(command: str) -> str:
    """A recorded command without its `--out FILE` (the merged file is the one that is kept)."""
    words = command.split()
    if "--out" in words:
        i = words.index("--out")
        del words[i:i + 2]
    return " ".join(words)


def merge_results(paths: list[Path], out: str, argv: list[str] | None) -> int:
    """One result from the cases of earlier runs (each keeps its own settings and load average)."""
    records = [json.loads(p.read_text()) for p in paths]
    for r in records:
        for c in r["cases"]:
            c["demo_s_per_image_same_run"] = r["demo_generation"]["s_per_image"]
    cases = sorted((c for r in records for c in r["cases"]), key=lambda c: c["schools"])
    demo = records[0]["demo_generation"]
    print(_table(cases, demo))
    targets = _targets(cases, demo)
    print(json.dumps(targets, indent=1))
    merged = {"merged_from": [{"command": _without_out(r["command"]), "settings": r["settings"],
                               "demo_generation": r["demo_generation"]} for r in records],
              "machine": records[0]["machine"], "demo_generation": demo, "targets": targets, "cases": cases}
    write_result(out, merged, module="simulations.bench.scale", argv=argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schools", default="10,100,1000", help="comma-separated federation sizes")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--students", type=int, default=300, help="mean students per school")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--preset", default="dp")
    parser.add_argument("--out", default="benchmarks/scale.json")
    parser.add_argument("--dir", default="", help="scratch parent folder (default: the system's temp folder)")
    parser.add_argument("--merge", default="", help="comma-separated result files of earlier runs (e.g. the 1,000-school "
                        "case run on its own, to fit the timing lock): their cases are combined, nothing is run")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_results([Path(p) for p in args.merge.split(",") if p.strip()], args.out, argv)
    sizes = [int(s) for s in args.schools.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="fedfer-scale-", dir=args.dir or None) as tmp:
        scratch = Path(tmp)
        demo = demo_seconds_per_image(scratch)
        cases = []
        for n in sizes:
            cases.append({**run_case(n, args, scratch), "demo_s_per_image_same_run": demo["s_per_image"]})
            print(_table(cases[-1:], demo).splitlines()[-1], flush=True)
    print(_table(cases, demo))
    targets = _targets(cases, demo)
    print(json.dumps(targets, indent=1))
    record = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "shared": True},
              "settings": {"fraction_train": args.fraction, "rounds": args.rounds, "students_per_school": args.students,
                           "image_size": args.size, "model": f"hafnet/{args.preset}", "generate": "on-demand",
                           "overrides": case_overrides(0, args, Path("WORK"))},
              "demo_generation": demo, "targets": targets, "cases": cases}
    write_result(args.out, record, module="simulations.bench.scale", argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
