"""Does anything a simulated run recorded give away a school's exact size? (issue 12's check)

Reads each synthetic school's true counts (students, frames; `school.json`, which never leaves the
school in a real deployment) and scans everything the coordinator holds after the run: metrics.jsonl,
events.jsonl, flower.log, the ledger copies. A number equal to a school's exact student or frame count,
or a batch size / sampling rate that recovers it (expected batch / q), is a leak. Prints a table and
exits 1 on any finding.

    python -m simulations.leak_scan runs/<id>
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def true_counts(data_root: Path) -> dict[str, dict[str, int]]:
    counts = {}
    for meta in sorted((data_root / "schools").glob("*/school.json")):
        info = json.loads(meta.read_text())
        counts[meta.parent.name] = {"students": int(info["num_students"]), "frames": int(info["num_frames"])}
    return counts


def scan(run: Path) -> tuple[dict[str, dict[str, int]], list[str]]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    counts = true_counts(Path(cfg["data"]["root"]))
    secrets = {value: f"{school} {kind}" for school, c in counts.items() for kind, value in c.items()}
    findings: list[str] = []
    files = [run / "metrics.jsonl", run / "events.jsonl", run / "flower.log", *sorted((run / "ledger").glob("*.jsonl"))]
    for path in files:
        if not path.exists():
            continue
        for number, line in _numbers(path):
            if float(number).is_integer() and int(float(number)) in secrets:
                findings.append(f"{path.name} line {line}: {number} = {secrets[int(float(number))]}")
    batch = int(cfg["train"]["batch_size"])
    for ledger in sorted((run / "ledger").glob("school-*.jsonl")):
        school = ledger.stem
        for i, text in enumerate(ledger.read_text().splitlines(), 1):
            q = json.loads(text).get("sample_rate") or 0
            if batch and q and round(batch / q) == counts.get(school, {}).get("students"):
                findings.append(f"{ledger.name} line {i}: batch/q = {round(batch / q)} = the exact student count")
    return counts, findings


def _numbers(path: Path):
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for match in NUMBER.finditer(line):
            yield match.group(0), i


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.leak_scan", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    args = parser.parse_args(argv)
    counts, findings = scan(args.run)
    print(f"{'school':<12} {'students':>9} {'frames':>8}")
    for school, c in counts.items():
        print(f"{school:<12} {c['students']:>9} {c['frames']:>8}")
    print(f"\n{len(findings)} finding(s)" + (":" if findings else ""))
    for finding in findings[:50]:
        print("  " + finding)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
