"""A nested state (an optimizer's ``state_dict()`` ...) saved without pickle: a safetensors file of its tensors
plus a JSON skeleton of everything else."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import torch

from rayflow.checkpoint.files import load_safetensors, read_json, save_safetensors_atomic, write_json_atomic
from rayflow.errors import RayflowError


# ---------------------------------------------------------------------- state_dict <-> tensors + JSON
def split_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (an optimizer's ``state_dict()`` ...) into a JSON skeleton and a flat tensor dict.

    Tensors are replaced by ``{"__tensor__": name}``, tuples by ``{"__tuple__": [...]}``, and dicts whose keys
    are not all strings (optimizer state is keyed by int) by ``{"__items__": [[key, value], ...]}``, so
    :func:`join_state` restores the exact structure, key types and tuple-ness. Raises ``TypeError`` on values
    that are neither tensors, containers nor JSON scalars.
    """
    tensors: dict[str, torch.Tensor] = {}

    def name_for(path: str) -> str:
        name, n = path or "tensor", 1
        while name in tensors:
            name, n = f"{path}#{n}", n + 1
        return name

    def walk(x: Any, path: str) -> Any:
        if torch.is_tensor(x):
            name = name_for(path)
            tensors[name] = x
            return {"__tensor__": name}
        if isinstance(x, Mapping):
            def sub(k: Any) -> str:
                return f"{path}.{k}" if path else str(k)

            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, sub(k)) for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot serialise a dict key of type {type(k).__name__} at {path!r}")
            return {"__items__": [[k, walk(v, sub(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, numbers.Integral):  # numpy integers ...
            return int(x)
        if isinstance(x, numbers.Real):
            return float(x)
        raise TypeError(f"cannot serialise a value of type {type(x).__name__} at {path!r} without pickle")

    return walk(obj, prefix), tensors


def join_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {"__tensor__"}:
                return tensors[x["__tensor__"]]
            if set(x) == {"__tuple__"}:
                return tuple(walk(v) for v in x["__tuple__"])
            if set(x) == {"__items__"}:
                return {k: walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def save_state(state: Any, tensors_path: str | os.PathLike, json_path: str | os.PathLike) -> None:
    """Save a nested state as ``tensors_path`` (safetensors) + ``json_path`` (its skeleton), atomically each."""
    skeleton, tensors = split_state(state)
    save_safetensors_atomic(tensors, tensors_path, metadata={"format": "pt"})
    write_json_atomic(skeleton, json_path)


def load_state(tensors_path: str | os.PathLike, json_path: str | os.PathLike) -> Any:
    """Load what :func:`save_state` wrote; a skeleton naming a tensor the file lacks is a :class:`RayflowError`."""
    tensors = load_safetensors(tensors_path)
    skeleton = read_json(json_path)
    try:
        return join_state(skeleton, tensors)
    except KeyError as exc:
        raise RayflowError(f"{tensors_path}: tensor {exc.args[0]!r} named by {json_path} is missing") from exc

