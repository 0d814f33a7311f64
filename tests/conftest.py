"""Shared test fixtures: seeded generators and the hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Tensor ops make the first examples slow (lazy init); a deadline would only add flakiness.
settings.register_profile(
    "lightning_acm",
    deadline=None,
    max_examples=50,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lightning_acm"))


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh for every test."""
    return torch.Generator().manual_seed(0)
