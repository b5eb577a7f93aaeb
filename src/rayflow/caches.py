"""Sharded, resumable safetensors caches for teacher outputs (reflow pairs, RayFlow's eps_mu targets).

A cache is a directory::

    meta.json                 what the cache was built from (teacher fingerprint, data, solver, NFE, CFG, ...)
    shard-00000.safetensors   items [0, shard_size)
    shard-00001.safetensors   items [shard_size, 2 * shard_size)
    ...
    flat/<key>.bin, index.json  (only when read mapped) the shards joined per key, mapped instead of loaded

Shard ``i`` always covers the same items and is computed from a generator seeded by ``(seed, i)``, so an
interrupted build resumes by computing only the missing shards: nothing is duplicated or lost. Each shard is
written atomically (temporary file + ``os.replace``). Under several processes shard ``i`` belongs to rank
``i % world_size``: every process writes its own shards and any process can read them all back.

A cache whose ``meta.json`` differs from the run's (another teacher, data set, K, CFG ...) is refused with a
:class:`~rayflow.errors.RayflowError` naming the first differing key.

Concurrent writers: ``meta.json`` is checked or written under an exclusive lock (``.cache.lock``), so of two
runs started together with different settings on one directory the second sees the first's ``meta.json`` and
is refused. Every shard also carries the fingerprint of the ``meta`` it was computed for (safetensors
metadata ``fingerprint``); a reader checks it on every shard, so a shard written under other settings is never
used as if it were this run's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rayflow.checkpoint import DirectoryLock, remove_orphan_tmp_files, save_safetensors_atomic, write_json_atomic
from rayflow.errors import RayflowError, require
from rayflow.progress import tqdm

ShardFn = Callable[[int, int, int, torch.Generator], dict[str, torch.Tensor]]
CACHE_LOCK = ".cache.lock"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short sha256 of a model's identity: its class, prediction type and every tensor in its state.

    Models without parameters (the exact mixture teacher) contribute their ``fingerprint()`` if they have one.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(str(getattr(model, "prediction_type", "")).encode())
    if hasattr(model, "fingerprint"):
        h.update(str(model.fingerprint()).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        # reshape(-1), not contiguous(): a channels-last 1x1 conv weight counts as contiguous yet has
        # stride(-1) != 1, and viewing it as bytes then fails (seen on the GPU with the bf16 teacher)
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def auto_shard_size(num_items: int, shards: int = 16, lo: int = 256, hi: int = 4096) -> int:
    """Items per shard when the caller does not choose: about ``shards`` shards, each of ``lo..hi`` items.

    A kill loses at most the shard being computed, so a pool is cut into ~16 pieces rather than 4096-item
    blocks (which made a 16384-pair pool lose a quarter of its work); shards stay large enough that their
    per-file overhead does not matter.
    """
    return max(lo, min(hi, -(-num_items // shards)))


def meta_fingerprint(meta: dict[str, Any]) -> str:
    """A short sha256 of a cache description (canonical JSON: sorted keys), stamped into every shard."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def shard_seed(seed: int, shard: int) -> int:
    """The generator seed of shard ``shard``: depends on nothing else, so resumed shards are identical."""
    return (seed * 1_000_003 + shard * 7_919 + 12_345) % (2**63)


class ShardedCache:
    """A resumable directory of safetensors shards described by ``meta``.

    Args:
        root: the cache directory (created if missing).
        meta: JSON-serialisable description; must match an existing cache's ``meta.json`` exactly.
        num_items: total number of items.
        shard_size: items per shard (the last shard may be shorter).
        rank, world_size: this process and how many build the cache together.
    """

    def __init__(self, root: str | Path, meta: dict[str, Any], num_items: int, shard_size: int = 4096,
                 rank: int = 0, world_size: int = 1) -> None:
        require(num_items >= 1, f"a cache needs at least one item, got {num_items}")
        require(shard_size >= 1, f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.rank, self.world_size = rank, world_size
        self.num_items = num_items
        self._set_meta(meta, shard_size)
        if self.root.exists() and not self.root.is_dir():
            raise RayflowError(f"{self.root}: the cache path exists and is not a directory")
        # short critical section (blocking): ranks of one run and concurrent runs wait for each other here only
        with DirectoryLock(self.root, CACHE_LOCK, blocking=True):
            self._check_or_write_meta()
            remove_orphan_tmp_files(self.root)

    # ------------------------------------------------------------------ meta
    def _set_meta(self, meta: dict[str, Any], shard_size: int) -> None:
        self.meta = {**json.loads(json.dumps(meta)), "num_items": self.num_items, "shard_size": shard_size}
        self.shard_size = shard_size
        self.num_shards = (self.num_items + shard_size - 1) // shard_size
        self.fingerprint = meta_fingerprint(self.meta)

    def _check_or_write_meta(self) -> None:
        path = self.root / "meta.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RayflowError(f"{path}: unreadable cache description ({exc})") from exc
            same_but_cut = (isinstance(old, dict) and isinstance(old.get("shard_size"), int)
                            and old["shard_size"] >= 1 and old["shard_size"] != self.shard_size
                            and {k: v for k, v in old.items() if k != "shard_size"}
                            == {k: v for k, v in self.meta.items() if k != "shard_size"})
            if same_but_cut:
                # the same cache cut into other shards (built before the shard size was chosen from the pool):
                # keep its cut, so its finished shards are reused rather than recomputed
                self._set_meta({k: v for k, v in old.items() if k not in ("num_items", "shard_size")},
                               old["shard_size"])
            if old != self.meta:
                key = next(k for k in sorted(set(old) | set(self.meta)) if old.get(k) != self.meta.get(k))
                raise RayflowError(
                    f"{self.root}: cache was built with {key}={old.get(key)!r} but this run uses "
                    f"{key}={self.meta.get(key)!r}; use another --cache directory or delete this one"
                )
            return
        # every rank may write it: under the lock the first writes, the others then find and compare it
        write_json_atomic(self.meta, path)

    # ------------------------------------------------------------------ shards
    def shard_path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.safetensors"

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(self.shard_size, self.num_items - start)

    def _read_shard(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        with safe_open(str(self.shard_path(index)), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})

    def _foreign(self, index: int, metadata: dict[str, str]) -> RayflowError | None:
        """The error for a shard computed under other settings (a fingerprint that is not this meta's)."""
        found = metadata.get("fingerprint")
        if found is None or found == self.fingerprint:
            return None
        return RayflowError(
            f"{self.shard_path(index)}: shard was computed with other settings (fingerprint {found}) than "
            f"{self.root / 'meta.json'} describes ({self.fingerprint}); another run shared this --cache: delete "
            "the directory and run again"
        )

    def _valid(self, index: int) -> bool:
        path = self.shard_path(index)
        if not path.exists():
            return False
        try:
            tensors, metadata = self._read_shard(index)
        except (SafetensorError, OSError, RuntimeError, ValueError):
            return False  # a truncated shard from a killed process: recompute it
        foreign = self._foreign(index, metadata)
        if foreign is not None:
            raise foreign
        if metadata.get("fingerprint") is None:
            return False  # written before shards carried a fingerprint: cannot be verified, recompute it
        _, count = self.shard_range(index)
        return bool(tensors) and all(t.shape[0] == count for t in tensors.values())

    def missing(self) -> list[int]:
        """Indices of this rank's shards that are absent or unreadable."""
        return [i for i in range(self.rank, self.num_shards, self.world_size) if not self._valid(i)]

    def build(self, make_shard: ShardFn, seed: int = 0, progress: bool = True, desc: str = "cache") -> int:
        """Compute this rank's missing shards with ``make_shard(index, start, count, generator)``.

        Returns the number of shards computed now (0 when the cache was already complete).
        """
        todo = self.missing()
        self.root.mkdir(parents=True, exist_ok=True)
        for index in tqdm(todo, disable=not progress or not todo, desc=desc):
            start, count = self.shard_range(index)
            g = torch.Generator().manual_seed(shard_seed(seed, index))
            tensors = make_shard(index, start, count, g)
            for name, t in tensors.items():
                require(t.shape[0] == count, f"shard {index}: tensor {name!r} has {t.shape[0]} rows, expected {count}")
            save_safetensors_atomic({k: v.detach() for k, v in tensors.items()}, self.shard_path(index),
                                    metadata={"shard": str(index), "start": str(start),
                                              "fingerprint": self.fingerprint})
        return len(todo)

    def is_complete(self) -> bool:
        return all(self._valid(i) for i in range(self.num_shards))

    def _checked_shards(self):
        """Each shard's tensors in index order, checked (present, readable, of this meta, the right size)."""
        for i in range(self.num_shards):
            path = self.shard_path(i)
            require(path.exists(), f"{path}: shard missing; run the same command again to finish the cache")
            try:
                tensors, metadata = self._read_shard(i)
            except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
                raise RayflowError(f"{path}: corrupt shard ({exc}); delete it and run again") from exc
            foreign = self._foreign(i, metadata)
            if foreign is not None:
                raise foreign
            require(metadata.get("fingerprint") == self.fingerprint,
                    f"{path}: shard carries no fingerprint of its settings; run the same command again to "
                    "recompute it")
            _, count = self.shard_range(i)
            require(all(t.shape[0] == count for t in tensors.values()),
                    f"{path}: shard holds the wrong number of items; delete it and run again")
            yield tensors

    def load(self) -> dict[str, torch.Tensor]:
        """All items, concatenated in index order. Every shard (of every rank) must be present."""
        parts = list(self._checked_shards())
        keys = parts[0].keys()
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    def load_mapped(self) -> dict[str, torch.Tensor]:
        """All items as file-backed tensors instead of in memory (for caches larger than memory, such as the
        latents and text embeddings of a Stable Diffusion data set).

        The shards are joined once, shard by shard, into one raw file per key (``flat/<key>.bin``, described by
        ``flat/index.json``, which carries this cache's fingerprint and is written last), then mapped
        copy-on-write with ``torch.from_file``: a run's memory holds only the pages of the rows it reads, which
        the OS loads on first touch and may drop again. The tensors are ordinary CPU tensors to every caller.
        """
        flat = self.root / FLAT_DIR
        index_path = flat / "index.json"
        with DirectoryLock(self.root, CACHE_LOCK, blocking=True):  # one rank joins, the others wait and map
            index = _read_flat_index(index_path)
            if index is None or index.get("fingerprint") != self.fingerprint:
                index = self._write_flat(flat)
        out = {}
        for key, info in index["keys"].items():
            shape, dtype = tuple(info["shape"]), getattr(torch, info["dtype"])
            path = flat / f"{key}.bin"
            numel = math.prod(shape)
            require(path.is_file() and path.stat().st_size == numel * torch.empty((), dtype=dtype).element_size(),
                    f"{path}: truncated or missing; delete {flat} and run again")
            out[key] = torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)
        return out

    def _write_flat(self, flat: Path) -> dict[str, Any]:
        if flat.exists():
            shutil.rmtree(flat)
        flat.mkdir(parents=True)
        files: dict[str, Any] = {}
        info: dict[str, dict[str, Any]] = {}
        try:
            for tensors in self._checked_shards():
                for key, t in tensors.items():
                    if key not in files:
                        files[key] = open(flat / f"{key}.bin", "wb")  # noqa: SIM115 - closed below
                        info[key] = {"shape": [0, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}
                    files[key].write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                    info[key]["shape"][0] += t.shape[0]
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
        index = {"fingerprint": self.fingerprint, "keys": info}
        write_json_atomic(index, flat / "index.json")
        return index


FLAT_DIR = "flat"


def _read_flat_index(path: Path) -> dict[str, Any] | None:
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("keys"), dict) else None


def build_or_load(root: str | Path | None, meta: dict[str, Any], num_items: int, make_shard: ShardFn, *,
                  seed: int = 0, shard_size: int | None = None, progress: bool = True, desc: str = "cache",
                  rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                  mapped: bool = False) -> dict[str, torch.Tensor]:
    """Build a cache at ``root`` (resuming) and return its contents; with ``root=None`` compute in memory.

    ``mapped``: return file-backed tensors (:meth:`ShardedCache.load_mapped`) instead of loading the cache into
    memory (only with a ``root``).

    ``barrier`` (e.g. ``accelerator.wait_for_everyone``) is called between building and loading so that every
    rank sees every shard. ``shard_size=None`` chooses it from the pool (:func:`auto_shard_size`).
    """
    if shard_size is None:
        shard_size = auto_shard_size(num_items)
    if root is None:
        parts = []
        for index, start in enumerate(range(0, num_items, shard_size)):
            count = min(shard_size, num_items - start)
            parts.append(make_shard(index, start, count, torch.Generator().manual_seed(shard_seed(seed, index))))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    cache = ShardedCache(root, meta, num_items, shard_size, rank, world_size)
    cache.build(make_shard, seed=seed, progress=progress, desc=desc)
    if barrier is not None:
        barrier()
    return cache.load_mapped() if mapped else cache.load()
