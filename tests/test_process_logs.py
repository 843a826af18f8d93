"""A node's log under `deploy/logs/` is appended to at every start (`fedfer deploy up` again after a stop, a
rotation, a lost ledger): what the supervisor reads of it must be this start's output only. Before, a second
`deploy up` took the previous start's "SuperNode ID" line as this start's acceptance (and said "running"
before the SuperLink had accepted the node), and a node whose start check failed was reported with every
earlier start's log flattened into the one-line error, the actual reason at its very end."""

from __future__ import annotations

import sys

import pytest

from server.processes import DeploymentError, Supervisor

EARLIER_START = "INFO: SuperNode ID: 8299016310334470443\nINFO: Sent successfully\n" * 50


def _failing_node(supervisor: Supervisor):
    """A node whose start check fails at once, as start.sh's preflight does: one line, exit 2."""
    return supervisor.start("school-01-supernode", [sys.executable, "-c",
                                                    "import sys; print('fedfer: ledger.jsonl: missing'); sys.exit(2)"])


def test_an_earlier_starts_log_line_is_not_taken_for_this_starts(tmp_path):
    (tmp_path / "school-01-supernode.log").write_text(EARLIER_START)
    with Supervisor(tmp_path) as supervisor:
        node = _failing_node(supervisor)
        with pytest.raises(DeploymentError) as failed:
            supervisor.wait_log(node, "SuperNode ID", timeout=30)
    message = str(failed.value)
    assert "exited with code 2" in message and "fedfer: ledger.jsonl: missing" in message
    assert "Sent successfully" not in message and "8299016310334470443" not in message


def test_a_node_that_exits_before_its_port_opens_is_reported_with_this_starts_output_only(tmp_path):
    (tmp_path / "school-01-supernode.log").write_text(EARLIER_START)
    with Supervisor(tmp_path) as supervisor:
        node = _failing_node(supervisor)
        with pytest.raises(DeploymentError) as failed:
            supervisor.wait_port(node, "127.0.0.1", 9, timeout=30)
    message = str(failed.value)
    assert "fedfer: ledger.jsonl: missing" in message and "Sent successfully" not in message
    assert str(tmp_path / "school-01-supernode.log") in message   # where the whole log is
    # the earlier starts' lines are kept in the file: only what is read of it changed
    assert (tmp_path / "school-01-supernode.log").read_text().startswith(EARLIER_START)
