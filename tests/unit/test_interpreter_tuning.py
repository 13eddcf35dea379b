"""The interpreter setting the app makes on start (``bootstrap.tune_interpreter``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from shared_code.bootstrap import tune_interpreter


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
