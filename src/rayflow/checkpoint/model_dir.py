"""Model directories: ``model.safetensors`` (the state_dict, less its reference weights) + ``config.json``.

Weights a network can rebuild from a reference are not written: a module with a ``reference_keys()`` method
(a LoRA student's :class:`~rayflow.models.text.TextUNetDenoiser`, whose frozen base is the teacher pipeline's
UNet, read back from the pipeline folder its config names) has those state_dict keys left out of
``model.safetensors`` and of every checkpoint (:func:`saved_state_dict`), and :func:`load_weights_strict`
accepts a file without them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from rayflow.checkpoint.files import load_safetensors, read_json, save_safetensors_atomic, write_json_atomic
from rayflow.errors import RayflowError
from rayflow.models.base import Denoiser

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"


# ---------------------------------------------------------------------- model directories
def _fmt_shape(shape: torch.Size | tuple[int, ...]) -> str:
    return str(tuple(int(s) for s in shape))


def unwrap_denoiser(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile`` and (Distributed)DataParallel wrappers, without modifying it.

    Unlike ``accelerator.unwrap_model(..., keep_fp32_wrapper=False)`` this never changes the module.
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
            continue
        return model


def reference_keys(model: torch.nn.Module) -> set[str]:
    """The state_dict keys of ``model`` that are not saved: those its modules' ``reference_keys()`` name (frozen
    weights rebuilt from elsewhere when the network is built, e.g. a LoRA student's base UNet)."""
    model = unwrap_denoiser(model)
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "reference_keys", None)
        if callable(fn):
            keys.update(f"{prefix}.{k}" if prefix else k for k in fn())
    return keys


def saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a model directory or a checkpoint stores of ``model``: its state_dict without :func:`reference_keys`."""
    model = unwrap_denoiser(model)
    skip = reference_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def save_model_dir(out_dir: str | os.PathLike, model: Denoiser, config: dict) -> None:
    """Write ``out_dir/model.safetensors`` (the state_dict) and ``out_dir/config.json`` atomically.

    ``config`` should carry ``"model": ModelConfig.to_dict()`` for :func:`load_model_dir`; ``rayflow_version``
    is added. Other files in ``out_dir`` are left alone.
    """
    from rayflow import __version__

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RayflowError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = saved_state_dict(model)
    save_safetensors_atomic(state, out_dir / MODEL_WEIGHTS, metadata={"format": "pt"})
    write_json_atomic({**config, "rayflow_version": __version__}, out_dir / MODEL_CONFIG)


def check_state_dict_fits(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str,
                          optional: set[str] | frozenset[str] = frozenset()) -> None:
    """Raise one-line :class:`RayflowError` (naming ``where``, the key and both shapes) unless ``state`` fits
    ``model`` exactly: same keys (those in ``optional`` may be absent), same shapes."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state and key not in optional:
            raise RayflowError(
                f"{where}: weights do not fit the config: missing key {key!r} (shape {_fmt_shape(value.shape)})"
            )
        if key in state and tuple(state[key].shape) != tuple(value.shape):
            raise RayflowError(
                f"{where}: weights do not fit the config: {key!r} has shape {_fmt_shape(state[key].shape)} in the "
                f"file but {_fmt_shape(value.shape)} in the model"
            )
    for key in state:
        if key not in expected:
            raise RayflowError(
                f"{where}: weights do not fit the config: unexpected key {key!r} "
                f"(shape {_fmt_shape(state[key].shape)})"
            )


def load_weights_strict(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a safetensors state_dict into ``model`` strictly, with one-line errors naming the file.

    The file may leave out the model's :func:`reference_keys` (and nothing else)."""
    state = load_safetensors(path)
    skip = reference_keys(model)
    check_state_dict_fits(model, state, os.fspath(path), optional=skip)
    try:
        # strict unless the file leaves out reference weights, which the model already holds
        model.load_state_dict(state, strict=not (skip - set(state)))
    except RuntimeError as exc:  # dtype problems the shape check cannot see
        raise RayflowError(f"{path}: cannot load weights: {str(exc).splitlines()[0]}") from exc


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """Rebuild the network saved by :func:`save_model_dir`; returns ``(model in eval mode, config)``.

    Errors are one-line :class:`RayflowError` naming the path: not a directory, no ``config.json``, no
    ``model.safetensors``, a config without ``"model"``, or weights that do not fit the config.
    """
    from rayflow.models.networks import ModelConfig, build_model

    path = Path(path)
    if not path.exists():
        raise RayflowError(f"{path}: no such directory")
    if not path.is_dir():
        raise RayflowError(f"{path}: not a directory (expected a model directory with {MODEL_CONFIG})")
    cfg_path, weights_path = path / MODEL_CONFIG, path / MODEL_WEIGHTS
    if not cfg_path.is_file():
        raise RayflowError(f"{path}: no {MODEL_CONFIG} here; not a rayflow model directory")
    if not weights_path.is_file():
        raise RayflowError(f"{path}: no {MODEL_WEIGHTS} here")
    config = read_json(cfg_path)
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict):
        raise RayflowError(f"{cfg_path}: no \"model\" section describing the network")
    try:
        model = build_model(ModelConfig.from_dict(model_cfg))
    except RayflowError as exc:
        raise RayflowError(f"{cfg_path}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise RayflowError(f"{cfg_path}: invalid model config: {str(exc).splitlines()[0]}") from exc
    load_weights_strict(model, weights_path)
    return model.to(device).eval(), config

