"""rayflow.devices: a copy kept per device, keyed by the device as asked (issue #13's per-step pool copy)."""

from __future__ import annotations

import torch

from rayflow import pairs as P
from rayflow.devices import DeviceCache


class _ReportsIndexedDevice(torch.Tensor):
    """A CPU tensor that reports ``cpu:0``, as a CUDA tensor reports ``cuda:0`` to a generator that says ``cuda``."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cpu", 0)


def test_device_cache_makes_once_per_device_asked_for():
    made: list[str] = []

    def make(device: torch.device) -> torch.Tensor:
        made.append(str(device))
        return torch.zeros(2, device=device)

    cache: DeviceCache[torch.Tensor] = DeviceCache()
    first = cache.get("cpu", make)
    assert cache.get(torch.device("cpu"), make) is first and made == ["cpu"]
    cache.get("meta", make)  # another device: made again, the old copy forgotten
    assert made == ["cpu", "meta"]
    assert cache.get("cpu", make) is not first and made == ["cpu", "meta", "cpu"]
    cache.clear()
    cache.get("cpu", make)
    assert made == ["cpu", "meta", "cpu", "cpu"]


def test_a_pair_pool_is_copied_to_the_device_once_even_when_its_copy_reports_another_device_name(monkeypatch):
    """The regression: the pool's copy reports ``cpu:0`` while the generator says ``cpu`` (on a GPU: ``cuda:0``
    against ``cuda``); comparing the two re-copied the pool on every batch."""
    pool = P.Pairs({"noise": torch.randn(16, 3), "sample": torch.randn(16, 3), "nfe": torch.ones(16)}, 16, 16)
    copies: list[str] = []

    def to(self, device):
        copies.append(str(device))
        return {k: v.as_subclass(_ReportsIndexedDevice) for k, v in self.tensors.items() if k != "nfe"}

    monkeypatch.setattr(P.Pairs, "to", to)
    gen = torch.Generator().manual_seed(0)
    batches = [pool.batch(4, gen) for _ in range(3)]
    assert copies == ["cpu"]
    assert all(set(b) == {"noise", "sample"} and b["noise"].shape == (4, 3) for b in batches)
    # the draws are the pool's rows, by index
    rows = torch.randint(0, 16, (4,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(batches[0]["noise"].as_subclass(torch.Tensor), pool["noise"][rows])


def test_host_threads_sets_and_restores_the_thread_count():
    from rayflow.devices import host_threads

    old = torch.get_num_threads()
    with host_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    try:
        with host_threads(1):
            raise ValueError("inside")
    except ValueError:
        pass
    assert torch.get_num_threads() == old  # restored on an error too
    with host_threads(old):  # already so: left alone
        assert torch.get_num_threads() == old
