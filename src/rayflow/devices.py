"""Tensors kept on a device: copied there once and found again by the device they were asked for.

Why not compare a cached copy's ``.device`` with the device asked for: a CUDA generator reports ``cuda`` while the
tensors it draws (and every copy to it) report ``cuda:0``, so the two never compare equal and the cache missed on
every call. In the training step that re-copied a whole pair pool from pageable host memory each step (about 5 ms
of transfer and a wait for the device per step on one H200: issue #13). The key here is the device *as asked*.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class DeviceCache(Generic[T]):
    """One value (a tensor, a dict of tensors, ...) made for one device at a time.

    ``get(device, make)`` returns the value made by ``make(device)`` the last time the same device was asked for,
    else makes it (and forgets the copy for the previous device).
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._value: T | None = None

    def get(self, device: torch.device | str, make: Callable[[torch.device], T]) -> T:
        key = str(device)
        if self._key != key:
            self._value, self._key = make(torch.device(device)), key
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        self._key, self._value = None, None


@contextlib.contextmanager
def host_threads(n: int = 1) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, restored after (also on an error).

    For tiny host work beside a GPU step, such as RayFlow's learned Time Sampler (a few hundred draws and a
    1000-bin density per step, under a millisecond on one thread): a thread pool gains it nothing, and on a
    many-core host its workers spin between the tiny ops. On one H200 machine (16 cores) that cost 115 ms of the
    process's CPU time per 11 ms training step, and the step's rate varied by up to 30 % between timing windows
    (BENCHMARKS §6.7). Setting the count is a few microseconds.
    """
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


__all__ = ["DeviceCache", "host_threads"]
