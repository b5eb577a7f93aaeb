"""Shared fixtures: tiny deterministic models and data, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.schedules import VPSchedule

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def linear_schedule() -> VPSchedule:
    return VPSchedule.linear(1000)


@pytest.fixture
def mog8() -> GaussianMixture:
    return GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)


@pytest.fixture
def exact_teacher(mog8, linear_schedule) -> ExactTeacher:
    return ExactTeacher(mog8, linear_schedule)
