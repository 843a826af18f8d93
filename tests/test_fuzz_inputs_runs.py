"""The bad-input fuzzer (`python -m simulations.fuzz_inputs`, README "Measured") builds its templates — a
deployment, a run with a checkpoint, a report — and runs one surface: it broke silently for several sessions
when a module it imports moved (issue 10), so the suite runs it (the checkpoint surface, ~40 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_fuzzer_builds_its_templates_and_every_checkpoint_case_is_refused_in_one_line(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "-m", "simulations.fuzz_inputs", "--timeout", "60", "--only", "checkpoint",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["totals"]) == {"ok"} and result["totals"]["ok"] >= 12, result["totals"]   # no other outcome
