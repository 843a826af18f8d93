"""Many schools on one machine: the decoded-school cache holds its byte budget, schools generated on
demand are the bytes an upfront build writes (also when two processes build one at once), the server's
run directory grows with the schools sampled rather than the schools in the federation, and the report
of a large federation shows distributions instead of one row per school."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.school_cache import SchoolCache, school_bytes
from shared_models.datasets.on_demand import SchoolNotGenerated, await_school, request_path
from shared_models.datasets.school_folder import SchoolData
from simulations import synth
from simulations.school_service import SchoolService

TINY = synth.SynthParams(schools=4, students_per_school=3, frames_per_student=1, public_students=2, public_frames=1,
                         image_size=16, heldout_students=1, indomain_schools=2, school_size_spread=0)


def _school(n_images: int, tag: int) -> SchoolData:
    return SchoolData(data_dir=Path(f"/nowhere/{tag}"), images=np.full((n_images, 8, 8, 3), tag, np.uint8),
                      labels=np.zeros(n_images, np.int64), student_ids=[f"s{tag}"] * n_images, fingerprint="")


def test_school_cache_holds_its_byte_budget_least_recently_used_out():
    size = school_bytes(_school(10, 0))
    cache = SchoolCache(int(3.5 * size))
    loaded: list[int] = []

    def get(tag: int, version: int = 0) -> SchoolData:
        def load() -> SchoolData:
            loaded.append(tag)
            return _school(10, tag)
        return cache.get(Path(f"/school/{tag}"), version, load)

    for tag in range(6):
        assert int(get(tag).images[0, 0, 0, 0]) == tag
        assert cache.held_bytes <= cache.budget_bytes
    assert len(cache) == 3 and [Path(f"/school/{t}") in cache for t in (3, 4, 5)] == [True] * 3
    get(3)                      # a hit moves school 3 to the back of the queue ...
    get(6)                      # ... so school 4 is the one evicted
    assert Path("/school/3") in cache and Path("/school/4") not in cache
    assert loaded == [0, 1, 2, 3, 4, 5, 6] and cache.evictions == 4
    get(3, version=1)           # labels.csv changed: decoded again, the stale copy dropped
    assert loaded[-1] == 3 and cache.held_bytes <= cache.budget_bytes
    big = cache.get(Path("/school/big"), 0, lambda: _school(100, 9))   # alone over the budget: kept while in use
    assert len(cache) == 1 and big.images.shape[0] == 100
    cache.get(Path("/school/0"), 0, lambda: _school(10, 0))
    assert Path("/school/big") not in cache and cache.held_bytes <= cache.budget_bytes


def test_load_data_keeps_at_most_the_configured_budget(tmp_path, monkeypatch):
    from client import school_round
    from client.node import NodeIdentity

    root = synth.ensure_dataset(tmp_path / "data", TINY, workers=1)
    monkeypatch.setattr(school_round, "_SCHOOL_CACHE", SchoolCache(0))
    one = school_bytes(school_round.load_school(root / "schools" / "school-00"))
    cfg = {"data.school_cache_mb": 0, "data.generate": "upfront", "model.name": "hafnet", "model.preset": "dp"}
    for index in range(TINY.schools):
        node = NodeIdentity(role="school", school_id=synth.school_id(index),
                            data_dir=root / "schools" / synth.school_id(index), simulated=True)
        assert len(school_round.load_data(node, cfg)) == 3
        assert len(school_round._SCHOOL_CACHE) == 1            # budget 0: only the school in use
    cfg["data.school_cache_mb"] = 1
    for index in range(TINY.schools):
        node = NodeIdentity(role="school", school_id=synth.school_id(index),
                            data_dir=root / "schools" / synth.school_id(index), simulated=True)
        school_round.load_data(node, cfg)
    assert len(school_round._SCHOOL_CACHE) == min(TINY.schools, 2**20 // one)
    assert school_round._SCHOOL_CACHE.held_bytes <= 2**20


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_on_demand_schools_are_the_upfront_bytes_and_built_once(tmp_path):
    upfront = synth.ensure_dataset(tmp_path / "upfront", TINY, workers=1)
    lazy = synth.ensure_dataset(tmp_path / "lazy", TINY, workers=1, on_demand=True)
    assert not (lazy / "schools").exists()                     # public and in-domain parts only
    manifest = json.loads((lazy / "manifest.json").read_text())
    full = json.loads((upfront / "manifest.json").read_text())
    for index in range(TINY.schools):                          # sizes known before a school is drawn
        sid = synth.school_id(index)
        assert manifest["counts"][sid]["students"] == full["counts"][sid]["students"]
        assert manifest["counts"][sid]["frames"] == full["counts"][sid]["frames"]
    assert _digests(lazy / "indomain") == _digests(upfront / "indomain")
    with SchoolService(lazy, TINY, workers=2) as service:
        waiters = [threading.Thread(target=await_school, args=(lazy / "schools" / "school-02", 60)) for _ in range(3)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
        with pytest.raises(SchoolNotGenerated, match="school-99"):
            await_school(lazy / "schools" / "school-99", 60)
    assert [school for school, _ in service.built] == ["school-02"]
    assert _digests(lazy / "schools" / "school-02") == _digests(upfront / "schools" / "school-02")
    assert sorted(p.name for p in (lazy / "schools").iterdir()) == ["school-02"]
    assert not request_path(lazy / "schools" / "school-02").exists()
    with pytest.raises(SchoolNotGenerated, match="not generated within"):   # nobody serves requests now
        await_school(lazy / "schools" / "school-01", 0.3)


def test_two_processes_building_one_school_write_it_once(tmp_path):
    root = tmp_path / "race"
    with ProcessPoolExecutor(2, mp_context=get_context("fork")) as pool:
        done = [pool.submit(synth.ensure_school, root, TINY, 1) for _ in range(2)]
        paths = {str(f.result()) for f in done}
    assert paths == {str(root / "schools" / "school-01")}
    reference = synth.ensure_school(tmp_path / "alone", TINY, 1)
    assert _digests(root / "schools" / "school-01") == _digests(reference)
    assert not list((root / "schools").glob(".tmp-*"))


# ----------------------------------------------------------------------------- report, many schools
def _many_school_run(run: Path, schools: int = 300, rounds: int = 5, per_round: int = 30) -> dict[str, float]:
    """A run directory as the ServerApp writes it for a large federation: 10 % of the schools per round,
    some refusing; returns each trained school's final ε."""
    rng = np.random.default_rng(0)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "hafnet", "preset": "dp"}, "federation": {"rounds": rounds, "schools": schools},
        "privacy": {"enabled": True, "budget": 8.0, "delta": 1e-5, "unit": "student"},
        "evaluation": {"benchmarks": "synthetic-fer2013"}}))
    (run / "ledger").mkdir()
    spent: dict[str, float] = {}
    lines = []
    for r in range(1, rounds + 1):
        train = {}
        for index in sorted(rng.choice(schools, per_round, replace=False)):
            school = f"school-{index:02d}"
            if index % 5 == 0:
                train[school] = {"status": "budget-exhausted", "reason": "over budget"}
                continue
            spent[school] = round(spent.get(school, 0.0) + float(rng.uniform(2.0, 4.0)), 3)
            train[school] = {"status": "ok", "epsilon": spent[school]}
            with (run / "ledger" / f"{school}.jsonl").open("a") as handle:
                handle.write(json.dumps({"school_id": school, "round": r, "epsilon": spent[school]}) + "\n")
        lines.append(json.dumps({"round": r, "train": train, "timing": {"round_seconds": 6.0},
                                 "evaluation": {"synthetic-fer2013": {"accuracy": 0.3 + 0.02 * r, "n": 100}}}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return spent


def test_report_of_many_schools_shows_distributions(tmp_path):
    from server.report import build_report

    spent = _many_school_run(tmp_path / "run")
    text = build_report(tmp_path / "run").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| school-")]
    assert rows == [], rows[:3]                                 # no table row per school
    assert "## Privacy across schools" in text and len(text.splitlines()) < 80
    quantile_row = next(line for line in text.splitlines() if line.startswith("| final ε per school |"))
    cells = [float(c) for c in quantile_row.strip("|").split("|")[1:]]
    finals = np.array(sorted(spent.values()))
    assert cells[0] == pytest.approx(finals.min(), abs=1e-3) and cells[-1] == pytest.approx(finals.max(), abs=1e-3)
    assert cells[3] == pytest.approx(float(np.median(finals)), abs=1e-3)
    assert "| budget-exhausted |" in text and "more)" in text   # refusals summarised, per round and overall
    assert (tmp_path / "run" / "plots" / "epsilon.png").stat().st_size > 10_000


# ------------------------------------------------------------------------ server side, 50 schools
@pytest.fixture(scope="module")
def fifty_schools(tmp_path_factory):
    work = tmp_path_factory.mktemp("fifty")
    cmd = [sys.executable, "-m", "fedfer", "simulate", "federation.schools=50", "federation.fraction_train=0.1",
           "federation.rounds=1", "federation.min_train_schools=2", "federation.evaluator=false",
           "data.generate=on-demand", "data.students_per_school=4", "data.frames_per_student=1",
           "data.public_students=4", "data.public_frames=1", "data.public_train_students=0", "data.image_size=16",
           "data.heldout_students=0", "evaluation.benchmarks=synthetic-fer2013", "evaluation.bootstrap=20",
           "train.batch_size=2", "model.pretrain=", "data.school_size_spread=30", "run.name=fifty", f"run.root={work / 'runs'}", f"data.root={work / 'data'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work


@pytest.mark.slow   # a real Flower simulation of 51 nodes (~35 s on an idle 2-core machine)
def test_server_side_files_follow_the_sampled_schools(fifty_schools):
    run = fifty_schools / "runs" / "fifty"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    sampled = sorted(record["train"])
    assert len(sampled) == 5 and all(o["status"] == "ok" for o in record["train"].values())
    assert sorted(p.stem for p in (run / "ledger").glob("*.jsonl")) == sampled
    assert sorted(p.stem for p in (run / "keys").glob("*.pub")) == sampled
    assert sorted(p.name for p in (fifty_schools / "data" / "schools").iterdir()) == sampled   # generated on demand
    server_files = [p for p in run.rglob("*") if p.is_file() and not p.relative_to(run).parts[0] in ("schools", ".flower")]
    assert len(server_files) < 40, sorted(str(p.relative_to(run)) for p in server_files)
