"""Speed of the synthetic classroom generator (drawing + writing): part by part in one process, then the
whole dataset in parallel processes as `fedfer simulate` builds it.

    python -m simulations.bench.synth [--schools 2] [--students 48] [--frames 24] [--size 64] [--workers 2] [--out benchmarks/synth.json]

Builds fresh schools and the public split in a temporary folder and reports images per second, both
wall-clock and per CPU-second of this process (the machine is shared; CPU time is the steadier number).
Prints a table and writes JSON with the command that produced it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from simulations import synth
from simulations.bench.results import write_result


def _measure(label: str, build, images: int) -> dict[str, float | int | str]:  # type: ignore[no-untyped-def]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    build()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"part": label, "images": images, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "images_per_s_wall": round(images / wall, 1), "images_per_s_cpu": round(images / cpu, 1)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schools", type=int, default=2)
    parser.add_argument("--students", type=int, default=48, help="mean students per school")
    parser.add_argument("--frames", type=int, default=24, help="still frames per student")
    parser.add_argument("--public", type=int, default=30, help="public identities")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the whole-dataset row (what `fedfer simulate` and `fedfer data synth` use)")
    parser.add_argument("--out", default="benchmarks/synth.json")
    parser.add_argument("--dir", default="", help="scratch parent folder (default: beside the real cache, "
                        "~/.cache/fedfer, because file-creation cost differs between folders)")
    return parser


def _measure_whole_dataset(root: Path, params: synth.SynthParams, workers: int) -> dict[str, float | int | str]:
    """The whole dataset as the commands build it: parts side by side in `workers` processes. CPU time
    here is the children's as well as this process's."""
    images_all = sum(synth.school_image_count(params, i) for i in range(params.schools)) + synth.public_image_count(params)
    wall0, t0 = time.perf_counter(), os.times()
    synth.ensure_dataset(root, params, workers=workers)
    wall, t1 = time.perf_counter() - wall0, os.times()
    cpu = (t1.user + t1.system + t1.children_user + t1.children_system) - (t0.user + t0.system + t0.children_user + t0.children_system)
    return {"part": f"dataset, {workers} processes", "images": images_all, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "images_per_s_wall": round(images_all / wall, 1),
            "images_per_s_cpu": round(images_all / max(cpu, 1e-9), 1)}


def _schools_total(rows: list[dict[str, float | int | str]], size: int) -> dict[str, float | int | str]:
    """The school rows summed into one row (the public split draws at another size, so it stays out)."""
    school_rows = [r for r in rows if str(r["part"]).startswith("school-")]
    images = sum(int(r["images"]) for r in school_rows)
    wall = sum(float(r["wall_s"]) for r in school_rows)
    cpu = sum(float(r["cpu_s"]) for r in school_rows)
    return {"part": f"schools total ({size}x{size})", "images": images, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "images_per_s_wall": round(images / wall, 1),
            "images_per_s_cpu": round(images / cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    params = synth.SynthParams(schools=args.schools, students_per_school=args.students,
                               frames_per_student=args.frames, public_students=args.public,
                               image_size=args.size, clips_per_student=args.clips, seed=7)
    scratch = Path(args.dir).expanduser() if args.dir else synth.default_root(params).parent.parent
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-", dir=scratch))
    rows = []
    try:
        for i in range(params.schools):
            rows.append(_measure(synth.school_id(i), lambda i=i: synth.ensure_school(tmp, params, i),
                                 synth.school_image_count(params, i)))
        rows.append(_measure("public (100px + 48px csv)", lambda: synth.ensure_public(tmp, params),
                             synth.public_image_count(params)))
        whole_row = _measure_whole_dataset(tmp / "whole", params, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = _schools_total(rows, args.size)
    rows.append(total)
    rows.append(whole_row)
    print(f"{'part':<28} {'images':>7} {'wall s':>8} {'cpu s':>8} {'img/s wall':>11} {'img/s cpu':>10}")
    for r in rows:
        print(f"{r['part']:<28} {r['images']:>7} {r['wall_s']:>8} {r['cpu_s']:>8} {r['images_per_s_wall']:>11} "
              f"{r['images_per_s_cpu']:>10}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "params": params.__dict__, "scratch_dir": str(scratch), "processes": 1, "writer_threads": 1,
        "workers_whole_dataset": args.workers, "rows": rows, "dataset_images_per_s_wall": whole_row["images_per_s_wall"],
        "school_images_per_s_wall": total["images_per_s_wall"], "school_images_per_s_cpu": total["images_per_s_cpu"],
        "machine": {"cpus": os.cpu_count(), "load_avg_1_5_15": load, "python": platform.python_version()},
        "note": "includes drawing, camera effects, PNG encoding and file writes; the machine is shared, so wall "
                "time depends on other load (see load_avg); cpu is this process's CPU time",
    }
    print(f"wrote {write_result(args.out, record, module='simulations.bench.synth', argv=argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
