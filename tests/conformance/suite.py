"""Dramatiq's own test suite, from the source distribution of the installed Dramatiq, run in a
pytest subprocess on one of the engine's brokers (see plugin/engine_conformance.py).

The source distribution ships Dramatiq's test modules but not their conftest.py (replaced by the
plugin), their common.py (replaced by plugin/dramatiq_tests_common.py) nor tests/middleware/.
It is downloaded with pip once per Dramatiq version into a cache directory, and only its tests
are unpacked: the installed Dramatiq is the one under test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import dramatiq

from .plugin import expectations

PLUGIN_DIR = Path(__file__).parent / "plugin"

#: Where unpacked suites are kept, one directory per Dramatiq version.
CACHE_DIR = Path(os.environ.get("ENGINE_CONFORMANCE_CACHE", Path.home() / ".cache" / "engine-conformance"))

#: The longest one test (setup and teardown included) may take before it is failed.
TEST_TIMEOUT_S = 30

#: pip's own retries and timeouts bound the download; this bounds pip.
DOWNLOAD_TIMEOUT_S = 300


#: Each combination runs as these parts, in parallel: Dramatiq's modules in two groups that take
#: about as long (most of the time goes to waits in joins, not to CPU).
PARTS = {
    "actors": ["tests/test_actors.py", "tests/test_rabbitmq.py"],
    "others": ["tests", "--ignore=tests/test_actors.py", "--ignore=tests/test_rabbitmq.py"],
}


class SuiteUnavailable(Exception):
    """Dramatiq's source distribution could not be downloaded or unpacked."""


def dramatiq_tests(version: str = dramatiq.__version__) -> Path:
    """The directory that holds Dramatiq `version`'s ``tests`` package, downloaded if needed.

    Raises:
      SuiteUnavailable: pip could not download the source distribution, or it has no tests.
    """
    root = CACHE_DIR / f"dramatiq-{version}"
    if not (root / "tests" / "__init__.py").exists():
        _unpack(_download(version), root)
    # Ours, not Dramatiq's: copied again each time, so that a change to it takes effect.
    shutil.copyfile(PLUGIN_DIR / "dramatiq_tests_common.py", root / "tests" / "common.py")
    return root


def _download(version: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="dramatiq-sdist-"))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(target)]
    try:
        subprocess.run(
            [*command, f"dramatiq=={version}"], check=True, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S
        )
    except subprocess.CalledProcessError as error:
        raise SuiteUnavailable(f"pip download dramatiq=={version} failed: {error.stderr.strip()[-500:]}") from None
    except subprocess.TimeoutExpired:
        raise SuiteUnavailable(f"pip download dramatiq=={version} took more than {DOWNLOAD_TIMEOUT_S} s") from None
    archives = list(target.glob("dramatiq-*.tar.gz"))
    if not archives:
        raise SuiteUnavailable(f"pip download dramatiq=={version} gave no source distribution: {os.listdir(target)}")
    return archives[0]


def _unpack(archive: Path, root: Path) -> None:
    """Unpack the archive's tests/*.py into `root`/tests, made a package as Dramatiq's is."""
    partial = Path(tempfile.mkdtemp(prefix=root.name + "-", dir=root.parent if root.parent.exists() else None))
    with tarfile.open(archive) as sdist:
        members = [m for m in sdist.getmembers() if m.isfile() and m.name.split("/")[1:2] == ["tests"]]
        if not members:
            raise SuiteUnavailable(f"{archive.name} has no tests directory")
        for member in members:
            member.name = "/".join(member.name.split("/")[1:])
        sdist.extractall(partial, members=members, filter="data")
    archive.unlink()
    (partial / "tests" / "__init__.py").touch()
    # An empty configuration, so that no pytest.ini or pyproject.toml above the cache is read.
    (partial / "pytest.ini").write_text("[pytest]\n")
    root.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)


def start(combination: str, part: str, root: Path, report: Path, environment: dict[str, str]) -> subprocess.Popen:
    """Start one of the `PARTS` of the suite in `root` on `combination` ("rabbitmq-engine", ...),
    its JUnit XML written to `report`, its output to `report` with ``.log``; `environment` adds
    the plugin's ``ENGINE_CONFORMANCE_*`` variables."""
    broker, middleware = combination.split("-")
    # The run's settings are the plugin's: none of this process's ENGINE_* may leak in.
    env = {name: value for name, value in os.environ.items() if not name.startswith("ENGINE_")}
    env.update(environment)
    env.update(
        ENGINE_CONFORMANCE_BROKER=broker,
        ENGINE_CONFORMANCE_MIDDLEWARE=middleware,
        ENGINE_CONFORMANCE_PARENT_PID=str(os.getpid()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGIN_DIR), env.get("PYTHONPATH")])),
    )
    command = [
        sys.executable, "-m", "pytest", *PARTS[part],
        "-p", "engine_conformance", "-p", "no:cacheprovider", "-p", "timeout",
        f"--timeout={TEST_TIMEOUT_S}", f"--junitxml={report}", "-o", "junit_family=xunit2",
        "-q", "-rfE", "--no-header", "--durations=15", "-W", "ignore::DeprecationWarning",
    ]  # fmt: skip
    log = open(report.with_suffix(".log"), "wb")
    with log:
        return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class Outcome:
    """What one run of the suite gave, compared with `expectations`."""

    combination: str
    passed: list[str] = field(default_factory=list)
    failed_expected: list[str] = field(default_factory=list)
    #: Failures not listed: regressions, or failures not yet classified.
    failed_unexpected: list[str] = field(default_factory=list)
    #: Listed failures that passed: the list is out of date.
    passed_unexpectedly: list[str] = field(default_factory=list)
    #: Listed as failing sometimes (timing), and passed.
    passed_sometimes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deselected: int = 0
    messages: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.combination}: {len(self.passed)} passed, {len(self.failed_expected)} failed as expected, "
            f"{len(self.failed_unexpected)} failed unexpectedly, {len(self.passed_unexpectedly)} listed but passed, "
            f"{len(self.skipped)} skipped, {self.deselected} deselected"
        )


def read_reports(combination: str, reports: list[Path]) -> Outcome:
    """The outcome of a combination's runs from their JUnit XML reports (and the deselected
    counts in their ``.log`` output).

    Raises:
      ValueError: a report is missing or malformed (its run died before writing it).
    """
    cases: list[ElementTree.Element] = []
    for report in reports:
        try:
            cases.extend(ElementTree.parse(report).getroot().iter("testcase"))
        except (OSError, ElementTree.ParseError) as error:
            raise ValueError(f"no report from the {combination} run: {error}") from None
    deselected = sum(_deselected_count(report.with_suffix(".log")) for report in reports)
    problems: dict[str, Optional[ElementTree.Element]] = {}
    for case in cases:
        test = f"{case.get('classname', '').rsplit('.', 1)[-1]}.py::{case.get('name')}"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        # A test whose teardown failed too has a second entry: the first problem stands.
        if problems.get(test) is None:
            problems[test] = problem
    outcome = Outcome(combination, deselected=deselected)
    for test, problem in problems.items():
        if problem is not None and problem.tag == "skipped":
            outcome.skipped.append(test)
            continue
        listed = expectations.expected_failure(test, combination)
        if problem is None:
            if listed is None:
                outcome.passed.append(test)
            elif listed.sometimes:
                outcome.passed_sometimes.append(test)
            else:
                outcome.passed_unexpectedly.append(test)
            continue
        outcome.messages[test] = " ".join(f"{problem.tag}: {problem.get('message', '')}".split())[:300]
        (outcome.failed_expected if listed is not None else outcome.failed_unexpected).append(test)
    return outcome


def _deselected_count(log: Path) -> int:
    """The ``N deselected`` of pytest's summary line in a run's output (0 if none)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        words = line.replace(",", " ").split()
        if "deselected" in words:
            return int(words[words.index("deselected") - 1])
    return 0
