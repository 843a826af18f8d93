"""The simulation's SuperLink starts on a free port even when the first port it was given is taken by the
time it binds (session 25: the default demo stopped with "SuperLink exited with code 1" on "address already
in use"), and ports are chosen where outgoing connections do not take them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server import processes


def test_ports_are_chosen_below_the_range_outgoing_connections_use() -> None:
    low, _ = processes._ephemeral_range()
    if low - processes._LOWEST_CHOSEN_PORT < 1000:
        pytest.skip("this machine's ephemeral range leaves no room below it")
    ports = processes.free_ports(20)
    assert len(set(ports)) == 20
    assert all(processes._LOWEST_CHOSEN_PORT <= p < low for p in ports)


def test_a_taken_port_is_skipped_when_choosing(monkeypatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setattr(processes, "_LOWEST_CHOSEN_PORT", port)
        monkeypatch.setattr(processes, "_ephemeral_range", lambda: (port + 1000, 60999))
        monkeypatch.setattr(processes.random.SystemRandom, "sample", lambda self, seq, k: list(seq)[:k])
        assert processes.free_port() == port + 1   # the first candidate, taken, was passed over


def test_the_superlink_is_started_again_on_another_port_when_its_port_was_taken(tmp_path: Path, monkeypatch) -> None:
    from simulations import launcher

    with socket.socket() as squatter:   # something else listens on the first port chosen
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        chosen = iter([taken])
        real_free_port = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda: next(chosen, None) or real_free_port())
        run_dir = tmp_path / "run"
        flwr_home = run_dir / ".flower"
        flwr_home.mkdir(parents=True)
        echoed: list[str] = []
        fed = launcher.Federation({"federation.schools": 1, "federation.evaluator": False}, run_dir, echo=echoed.append)
        try:
            port = launcher._start_healthy_superlink(fed, flwr_home, launcher.offline_env(flwr_home), run_dir,
                                                     run_dir / "superlink.log")
        finally:
            fed.stop_processes()
    assert port != taken
    assert f'address = "127.0.0.1:{port}"' in (flwr_home / "config.toml").read_text()
    assert echoed == [f"  port {taken} was taken before the SuperLink bound it; starting it on another port"]
    assert "address already in use" in (run_dir / "superlink.log").read_text()


def test_a_superlink_that_exits_is_reported_with_the_line_that_says_why(tmp_path: Path) -> None:
    import subprocess
    import sys

    from simulations.launcher import SimulationError, _wait_healthy

    log = tmp_path / "superlink.log"
    log.write_text("INFO :      Starting Flower SuperLink\n2026-12-05T07:58:24.329Z ERROR [uvicorn.error] [Errno 98] "
                   "error while attempting to bind on address ('127.0.0.1', 34269): address already in use\n")
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    exited.wait()
    with pytest.raises(SimulationError) as err:
        _wait_healthy(1, exited, log)
    assert str(err.value) == ("SuperLink exited with code 1: [Errno 98] error while attempting to bind on address "
                              f"('127.0.0.1', 34269): address already in use; see {log}")


def test_flowers_coloured_error_lines_are_read_without_their_colour(tmp_path: Path) -> None:
    from simulations.launcher import _first_error_line

    log = tmp_path / "superlink.log"
    log.write_text("\x1b[92mINFO \x1b[0m:      Starting\n\x1b[91mERROR \x1b[0m:     Address (x) cannot be parsed.\n")
    assert _first_error_line(log) == "Address (x) cannot be parsed."
