"""The systemd units are valid, stop workers gracefully and bring every process back when it exits."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, STOP_MARGIN_S, need_tool
from tests.support.processes import run_process

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
#: Units whose processes run jobs: they must outwait the engine's shutdown timeout.
WORKER_UNITS = {"engine-worker.service", "engine-dramatiq.service", "engine-run.service"}
#: Where the units expect the engine installed.
VENV_BIN = "/srv/engine/.venv/bin/"


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    return unit


def example_settings() -> dict[str, str]:
    lines = (DEPLOY / "engine.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_there_are_units_to_check():
    assert {path.name for path in UNITS} == WORKER_UNITS | {"engine-scheduler.service", "engine-api.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_systemd_finds_a_unit_valid(path, tmp_path):
    """`systemd-analyze verify` with the engine's commands where the unit expects them (it
    checks that they exist); any warning (an unknown key, a bad value) fails too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("engine", "dramatiq"):
        (bin_dir / command).write_text("#!/bin/sh\n")
        (bin_dir / command).chmod(0o755)
    unit = tmp_path / path.name
    unit.write_text(path.read_text().replace(VENV_BIN, f"{bin_dir}/"))

    done = run_process([need_tool("systemd-analyze"), "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)

    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_a_unit_signals_only_the_main_process_and_restarts_it(path):
    service = read_unit(path)["Service"]

    assert service["KillMode"] == "mixed"  # SIGTERM to the main process; its workers stop gracefully
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "always"
    assert service["ExecStart"].startswith(VENV_BIN)
    assert service["EnvironmentFile"].lstrip("-") == "/etc/engine/engine.env"


@pytest.mark.parametrize("name", sorted(WORKER_UNITS))
def test_workers_get_longer_than_the_shutdown_timeout_to_stop(name):
    shutdown_timeout_s = float(example_settings()["ENGINE_SHUTDOWN_TIMEOUT_S"])
    assert int(read_unit(DEPLOY / "systemd" / name)["Service"]["TimeoutStopSec"]) == shutdown_timeout_s + STOP_MARGIN_S


@pytest.mark.parametrize("name, command", [("engine-worker.service", "worker"), ("engine-scheduler.service", "scheduler"), ("engine-api.service", "api")])
def test_each_part_of_a_distributed_deployment_has_its_unit(name, command):
    assert read_unit(DEPLOY / "systemd" / name)["Service"]["ExecStart"] == f"{VENV_BIN}engine {command}"
