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


def test_an_accepted_case_whose_result_is_wrong_is_not_ok(tmp_path):
    """A case's own check of what the command wrote (e.g. restore-ledger's accountant brought up to the copies):
    an exit 0 that left the wrong result is `wrong-result`, which fails the run, not `ok`."""
    from simulations.fuzz_inputs import Case, classify

    def case(problem: str) -> Case:
        return Case("deploy", "restore-x", ["deploy"], expect="accept", check=lambda d: problem)

    assert classify(case("the accountant counts less"), 0, "", {}, {}, tmp_path) == "wrong-result"
    assert classify(case(""), 0, "", {}, {}, tmp_path) == "ok"
    assert classify(case("never looked at"), 2, "refused", {}, {}, tmp_path) == "refused-valid"
