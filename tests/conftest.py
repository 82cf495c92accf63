r"""Shared pytest configuration: deterministic seeds, device option, hypothesis profile, value-check reset."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

try:  # hypothesis is a test extra; the profile only matters where it is installed
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "protocl",
        deadline=None,
        max_examples=25,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "protocl"))
except ImportError:  # pragma: no cover
    pass


def pytest_addoption(parser):
    r"""``--device`` picks where the core tests run (default ``cpu``)."""
    parser.addoption("--device", action="store", default="cpu", help="torch device for the tests (cpu, cuda)")


def pytest_collection_modifyitems(config, items):
    r"""Skip ``needs_cuda`` tests when CUDA is absent (they are extra checks, never the only check)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    r"""Seed every RNG before each test so that failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _value_checks_on():
    r"""Run every test with value checks enabled and restore them afterwards (a test may switch them off)."""
    try:
        import protocl
    except ImportError:  # pragma: no cover
        yield
        return
    setter = getattr(protocl, "set_value_checks", None)
    if setter is not None:
        setter(True)
    yield
    if setter is not None:
        setter(True)


@pytest.fixture
def deferred_checks(monkeypatch):
    r"""Rehearse the CUDA path of the value checks on CPU: every check is queued (no raise in the call itself) and
    reported by a later protocl call or ``flush_value_checks``. Anything left pending is dropped afterwards."""
    from protocl import _validation

    monkeypatch.setattr(_validation, "deferred", lambda t: True)
    yield
    _validation._PENDING.clear()


@pytest.fixture
def device(request) -> torch.device:
    r"""The device chosen with ``--device``."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return dev
