"""Crash-safe files: atomic JSON / safetensors writes, and model directories.

Nothing here uses pickle: weights are safetensors, everything else is JSON. Every write goes to a temporary
file in the destination's directory, is fsync'ed, then ``os.replace``'d over the target, so a crash leaves
either the old file or the new one, never a torn one.

A *model directory* holds::

    model.safetensors   the network's state_dict (contiguous CPU tensors)
    config.json         {"model": ModelConfig.to_dict(), ..., "rayflow_version": "x.y.z"}

and :func:`load_model_dir` rebuilds the network from it with :func:`rayflow.models.build_model`.

Weights a network can rebuild from a reference are not written: a module with a ``reference_keys()`` method
(a LoRA student's :class:`~rayflow.models.text.TextUNetDenoiser`, whose frozen base is the teacher pipeline's
UNet, read back from the pipeline folder its config names) has those state_dict keys left out of
``model.safetensors`` and of every checkpoint (:func:`saved_state_dict`), and :func:`load_weights_strict`
accepts a file without them. A SD1.5 LoRA student then saves 0.27 GB (rank 64) instead of 3.4 GB.

The package, by responsibility (each name is re-exported here, so ``from rayflow.checkpoint import X`` works):

- :mod:`~rayflow.checkpoint.files`: atomic writes (bytes, text, JSON, safetensors), orphan temporary files,
  and reading safetensors / JSON with one-line :class:`~rayflow.errors.RayflowError` messages;
- :mod:`~rayflow.checkpoint.state`: nested states (optimizer ``state_dict()`` ...) as safetensors + JSON;
- :mod:`~rayflow.checkpoint.model_dir`: model directories, reference weights, strict weight loading;
- :mod:`~rayflow.checkpoint.run_dir`: the directory lock and claiming a run's ``--out``.
"""

from __future__ import annotations

from rayflow.checkpoint.files import (
    fsync_dir,
    load_safetensors,
    load_safetensors_with_metadata,
    read_json,
    remove_orphan_tmp_files,
    save_safetensors_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from rayflow.checkpoint.model_dir import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    check_state_dict_fits,
    load_model_dir,
    load_weights_strict,
    reference_keys,
    save_model_dir,
    saved_state_dict,
    unwrap_denoiser,
)
from rayflow.checkpoint.run_dir import (
    RUN_LOCK,
    DirectoryLock,
    RunDirectory,
    check_not_finished_elsewhere,
    has_resumable_checkpoint,
)
from rayflow.checkpoint.state import join_state, load_state, save_state, split_state

__all__ = [
    "MODEL_CONFIG",
    "MODEL_WEIGHTS",
    "RUN_LOCK",
    "DirectoryLock",
    "RunDirectory",
    "check_not_finished_elsewhere",
    "check_state_dict_fits",
    "fsync_dir",
    "has_resumable_checkpoint",
    "join_state",
    "load_model_dir",
    "load_safetensors",
    "load_safetensors_with_metadata",
    "load_state",
    "load_weights_strict",
    "read_json",
    "reference_keys",
    "remove_orphan_tmp_files",
    "save_model_dir",
    "save_safetensors_atomic",
    "save_state",
    "saved_state_dict",
    "split_state",
    "unwrap_denoiser",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
