"""Tensors kept on a device: copied there once and found again by the device they were asked for.

Why not compare a cached copy's ``.device`` with the device asked for: a CUDA generator reports ``cuda`` while the
tensors it draws (and every copy to it) report ``cuda:0``, so the two never compare equal and the cache missed on
every call. In the training step that re-copied a whole pair pool from pageable host memory each step (about 5 ms
of transfer and a wait for the device per step on one H200: issue #13). The key here is the device *as asked*.
"""

from __future__ import annotations

from collections.abc import Callable
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


__all__ = ["DeviceCache"]
