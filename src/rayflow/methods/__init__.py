"""Distillation methods. Adding one: a file here with a :class:`Method` subclass, and one line in ``METHODS``."""

from __future__ import annotations

from rayflow.errors import RayflowError
from rayflow.methods.base import CountingDenoiser, DistillContext, DistillResult, Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in METHODS:
        raise RayflowError(f"unknown method {name!r}; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    # imported lazily so that a method module may import this package's helpers without a cycle
    import importlib

    for module in ("rayflow", "reflow", "perflow", "rectified_diffusion", "proreflow"):
        try:
            importlib.import_module(f"rayflow.methods.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rayflow.methods.{module}":
                raise


__all__ = ["CountingDenoiser", "DistillContext", "DistillResult", "METHODS", "Method", "available_methods",
           "get_method", "register"]
