"""Data spec strings: ``name`` or ``name:key=value,key=value``, parsed and read as typed options."""

from __future__ import annotations

import math
from pathlib import Path

from rayflow.errors import RayflowError
from rayflow.validate import whole_number

DEFAULT_DATA = "digits"

SPLITS: tuple[str, ...] = ("train", "test")


# ---------------------------------------------------------------------- spec parsing
def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:key=value,key=value"`` into ``(name, {key: value})``.

    Names and keys are lower-cased and everything is stripped of surrounding whitespace; values keep their case
    (they may be paths). The name ends at the first ``:`` and each value at the next ``,``, so a value may
    contain ``:`` or ``=`` but not ``,``. Empty names, items, keys or values and repeated keys are errors.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RayflowError(f"empty data spec; expected name or name:key=value,... (e.g. {DEFAULT_DATA})")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise RayflowError(f"data spec {spec!r} has no dataset name before ':'")
    options: dict[str, str] = {}
    if not sep:
        return name, options
    if not rest.strip():
        raise RayflowError(f"data spec {spec!r}: nothing after ':'; expected key=value options or a bare name")
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not item.strip():
            raise RayflowError(f"data spec {spec!r}: empty option (two commas in a row, or a trailing comma?)")
        if not eq:
            raise RayflowError(f"data spec {spec!r}: option {item.strip()!r} is not of the form key=value")
        if not key:
            raise RayflowError(f"data spec {spec!r}: option {item.strip()!r} has no key")
        if not value:
            raise RayflowError(f"{name}: option {key!r} has an empty value")
        if key in options:
            raise RayflowError(f"{name}: option {key!r} is given twice")
        options[key] = value
    return name, options


def _canonical_spec(name: str, options: dict[str, str]) -> str:
    """``name`` or ``name:key=value,...`` with keys sorted, so equal specs compare equal as strings."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={options[k]}" for k in sorted(options))


class _Options:
    """Typed access to one spec's options, with messages that name the dataset and the option."""

    def __init__(self, name: str, options: dict[str, str], allowed: tuple[str, ...]) -> None:
        self.name = name
        self.options = options
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            valid = ", ".join(sorted(allowed)) if allowed else "none"
            raise RayflowError(f"{name}: unknown option {unknown[0]!r}; valid options: {valid}")

    def has(self, key: str) -> bool:
        return key in self.options

    def required(self, key: str, what: str) -> str:
        if key not in self.options:
            raise RayflowError(f"{self.name}: missing option {key}=<{what}> (e.g. {self.name}:{key}=...)")
        return self.options[key]

    def integer(self, key: str, default: int, minimum: int | None = None) -> int:
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            value = whole_number(raw)  # n=2e4 is allowed
        except ValueError:
            raise RayflowError(f"{self.name}: {key} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise RayflowError(f"{self.name}: {key} must be >= {minimum}, got {value}")
        return value

    def number(self, key: str, default: float, positive: bool = False) -> float:
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            value = float(raw)
        except ValueError:
            raise RayflowError(f"{self.name}: {key} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise RayflowError(f"{self.name}: {key} must be finite, got {raw!r}")
        if positive and value <= 0:
            raise RayflowError(f"{self.name}: {key} must be > 0, got {raw}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        if key not in self.options:
            return default
        value = self.options[key].lower()
        if value not in choices:
            raise RayflowError(f"{self.name}: {key} must be one of {'|'.join(choices)}, got {self.options[key]!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.choice(key, ("0", "1", "false", "true", "no", "yes"), None)
        if value is None:
            return default
        return value in ("1", "true", "yes")

    def pad(self) -> int | str | None:
        """``pad=N`` (an int >= 1) or ``pad=pow2``; ``None`` when absent."""
        if not self.has("pad"):
            return None
        if self.options["pad"].lower() in ("pow2", "none"):
            return None if self.options["pad"].lower() == "none" else "pow2"
        return self.integer("pad", 0, minimum=1)

    def path(self, key: str, what: str) -> Path:
        return Path(self.required(key, what)).expanduser()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise RayflowError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _limit(opts: _Options) -> int | None:
    return opts.integer("limit", 0, minimum=1) if opts.has("limit") else None
