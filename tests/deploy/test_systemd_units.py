"""The systemd units stop workers gracefully and bring them back when they exit."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parents[2] / "deploy" / "systemd").glob("*.service"))


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path)
    return unit


def test_there_are_units_to_check():
    assert {path.name for path in UNITS} >= {"engine-worker.service", "engine-dramatiq.service", "engine-run.service"}


@pytest.mark.parametrize("path", UNITS, ids=lambda path: path.name)
def test_a_unit_signals_only_the_main_process_and_restarts_it(path):
    service = read_unit(path)["Service"]

    assert service["KillMode"] == "mixed"  # SIGTERM to the main process; its workers stop gracefully
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "always"
    assert int(service["TimeoutStopSec"]) > 600  # longer than the engine's shutdown timeout
    assert service["ExecStart"].split()[0].endswith(("/engine", "/dramatiq"))
