"""Shared fixtures: tiny settings so that every test trains in well under a second."""
from __future__ import annotations

import pytest

from mtlbench.config import RunConfig
from mtlbench.engine import load_data

from helpers import tiny_config as make_tiny_config


@pytest.fixture
def tiny_config() -> RunConfig:
    return make_tiny_config()


@pytest.fixture
def tiny_data(tiny_config):
    return load_data(tiny_config)
