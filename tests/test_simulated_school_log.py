"""Why a simulated school sent no update: its data folder refused, or its round failed. The reply said
"(details in the school's log)", but a simulated school wrote no log (a simulation's Flower log is the
coordinator's, so the details were dropped): the engineer had nothing to read. Now a simulated school keeps
`<state dir>/school.log` and its reply names that file; a deployed school still logs to its own log and its
reply names no path."""

from __future__ import annotations

from pathlib import Path

from client.node import NodeIdentity
from client.school_round import SIMULATED_SCHOOL_LOG, _usable_data
from shared_models.config import load_config


def _school(tmp_path: Path, labels: str | None, simulated: bool = True) -> NodeIdentity:
    data = tmp_path / "data" / "school-01"
    data.mkdir(parents=True)
    if labels is not None:
        (data / "labels.csv").write_text(labels)
    return NodeIdentity(role="school", school_id="school-01", data_dir=data, state_dir=tmp_path / "state" / "school-01",
                        simulated=simulated)


def test_a_simulated_school_without_usable_images_says_where_the_details_are(tmp_path):
    node = _school(tmp_path, "path,label,student_id\nimages/gone.png,happy,s1\n")
    reply = _usable_data(node, load_config(None, []))
    log = node.state_dir / SIMULATED_SCHOOL_LOG
    assert reply.status == "no-data" and f"(details in {log})" in reply.reason
    assert "school-01: no usable images" in log.read_text() and "gone.png" in log.read_text()


def test_a_simulated_school_whose_labels_are_missing_says_where_the_details_are(tmp_path):
    node = _school(tmp_path, None)
    reply = _usable_data(node, load_config(None, []))
    log = node.state_dir / SIMULATED_SCHOOL_LOG
    assert reply.status == "no-data" and str(log) in reply.reason
    assert "labels.csv: file not found" in log.read_text()


def test_a_deployed_schools_reply_names_no_path(tmp_path):
    node = _school(tmp_path, None, simulated=False)
    reply = _usable_data(node, load_config(None, []))
    assert reply.reason.endswith("(details in the school's log)") and str(tmp_path) not in reply.reason
    assert not (node.state_dir / SIMULATED_SCHOOL_LOG).exists()


def test_a_simulated_schools_failed_round_leaves_its_traceback_in_its_log(tmp_path):
    from client.app import _log_failure

    node = _school(tmp_path, None)
    try:
        raise RuntimeError("what broke")
    except RuntimeError:
        _log_failure(node)
    text = (node.state_dir / SIMULATED_SCHOOL_LOG).read_text()
    assert "school-01: the round failed" in text and "RuntimeError: what broke" in text
