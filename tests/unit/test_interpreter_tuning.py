"""The interpreter setting the app makes on start (``bootstrap.tune_interpreter``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared_code.bootstrap import tune_interpreter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restored_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("restored_interval")
def test_the_gil_switch_interval_is_lowered_to_one_millisecond() -> None:
    sys.setswitchinterval(0.005)  # CPython's default
    tune_interpreter()
    assert sys.getswitchinterval() == pytest.approx(0.001)


@pytest.mark.usefixtures("restored_interval")
def test_a_shorter_interval_chosen_by_the_host_is_kept() -> None:
    sys.setswitchinterval(0.0002)
    tune_interpreter()
    assert sys.getswitchinterval() == pytest.approx(0.0002)


def switch_interval_after(statement: str) -> float:
    """The switch interval of a fresh interpreter after ``statement``."""
    probe = f"import sys; {statement}; print(sys.getswitchinterval())"
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_the_functions_app_tunes_the_interpreter_when_the_host_loads_it() -> None:
    assert switch_interval_after("import function_app") == pytest.approx(0.001)


def test_importing_the_apps_code_leaves_the_interpreter_alone() -> None:
    """Only an entry point (``function_app``, ``python -m shared_code``) sets the interval."""
    assert switch_interval_after("import shared_code.bootstrap, shared_code.cli") == pytest.approx(0.005)
