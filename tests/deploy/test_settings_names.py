"""Every ENGINE_* variable the deploy files name is a setting of engine/settings.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.settings import Settings
from tests.deploy.conftest import DEPLOY, ROOT, engine_variables

SETTINGS = {f"ENGINE_{name.upper()}" for name in Settings.model_fields}
DEPLOY_FILES = sorted(path for path in DEPLOY.rglob("*") if path.is_file())


def test_there_are_deploy_files_naming_settings():
    assert sum(bool(engine_variables(path.read_text())) for path in DEPLOY_FILES) >= 10


@pytest.mark.parametrize("path", [*DEPLOY_FILES, ROOT / "docs" / "operations.md"], ids=lambda path: str(path.relative_to(ROOT)))
def test_a_file_names_only_real_settings(path: Path):
    assert engine_variables(path.read_text()) - SETTINGS == set()
