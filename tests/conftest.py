"""Shared fixtures: tiny deterministic models and data, nothing downloaded."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.schedules import VPSchedule

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(script: str, name: str) -> Iterator[ModuleType]:
    """``benchmarks/<script>`` imported as the module ``name``; registered in ``sys.modules`` while in use,
    because the scripts' dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's thread pool set to ``n`` inside the block: torch's default 2 threads spin-wait against each other
    on a shared 2-core machine (up to ~50x slower there)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_for_module() -> Iterator[None]:
    """:func:`one_thread` for a whole module, including its module-scoped fixtures (tiny pipelines)."""
    with torch_threads(1):
        yield


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


@pytest.fixture
def fm_dir(tmp_path) -> Path:
    """A tiny Fashion-MNIST folder (gzipped IDX, 40 train and 16 test images) for the benchmark scripts' dry runs."""
    from test_data import make_mnist_dir

    root = tmp_path / "fm"
    root.mkdir()
    make_mnist_dir(root, gz=True, n_train=40, n_test=16)
    return root
