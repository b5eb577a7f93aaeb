"""benchmarks/host_ops.py: its Trainer host-overhead timing runs and reports both loops."""

from __future__ import annotations

import pytest

from conftest import benchmark_module


@pytest.fixture(scope="module")
def host_ops():
    with benchmark_module("host_ops.py", "bench_host_ops") as module:
        yield module


def test_trainer_overhead_times_both_loops(host_ops, one_thread) -> None:
    row = host_ops.trainer_overhead(steps=5, warmup=2, repeats=1)
    assert row["trainer_ms_per_step"] > 0 and row["bare_ms_per_step"] > 0
    assert row["overhead_ms"] == pytest.approx(row["trainer_ms_per_step"] - row["bare_ms_per_step"], abs=2e-3)
    assert row["trainer_aten_ops_per_step"] > 0
