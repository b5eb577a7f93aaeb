"""Crash-safe checkpoints and exact resume: the checkpoint half of :class:`~rayflow.training.Trainer`, as a mixin
over the trainer's state (see the package docstring for the on-disk layout)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from rayflow.checkpoint import (
    fsync_dir,
    load_safetensors_with_metadata,
    load_state,
    load_weights_strict,
    read_json,
    save_safetensors_atomic,
    save_state,
    saved_state_dict,
    write_json_atomic,
    write_text_atomic,
)
from rayflow.errors import RayflowError, require
from rayflow.training.config import TrainConfig

#: train-config keys that may change between a checkpoint and its resume: they do not affect the weights (or,
#: for the speed settings, only in the last bits)
RESUME_MUTABLE_TRAIN_KEYS = ("max_steps", "progress", "log_every", "checkpoint_every", "keep_checkpoints",
                             "compile", "channels_last", "divergence_factor", "compile_mode",
                             "layout_optimization", "kernel_tuning", "step_graph")
#: train-config keys that may change on resume with a one-line notice: the remedies for a diverged run
RESUME_NOTICE_TRAIN_KEYS = ("lr", "warmup_steps", "lr_schedule", "grad_clip")
CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAIN_LOG = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
_HISTORY = 1000  # interval losses kept in state.json for the divergence check of a resumed run


# ---------------------------------------------------------------------- helpers
def _normalise(obj: Any) -> Any:
    """A JSON round trip (tuples -> lists ...), so configs compare the way they are stored."""
    return json.loads(json.dumps(obj))


def _first_difference(old: Any, new: Any, path: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                return sub, old[key], "<absent>"
            if key not in old:
                return sub, "<absent>", new[key]
            diff = _first_difference(old[key], new[key], sub)
            if diff is not None:
                return diff
        return None
    if old != new:
        return path or "<config>", old, new
    return None


def _with_train_defaults(config: dict) -> dict:
    """``config`` with the train keys a checkpoint of an older version lacks filled in with their defaults (a
    key added since then, e.g. ``gradient_accumulation_steps``, had its default's behaviour)."""
    cfg = copy.deepcopy(config)
    train = cfg.get("train")
    if isinstance(train, dict):
        defaults = _normalise(dataclasses.asdict(TrainConfig()))
        cfg["train"] = {**defaults, **train}
    return cfg


def _comparable(config: dict) -> dict:
    cfg = _with_train_defaults(config)
    train = cfg.get("train")
    if isinstance(train, dict):
        for key in RESUME_MUTABLE_TRAIN_KEYS + RESUME_NOTICE_TRAIN_KEYS:
            train.pop(key, None)
    return cfg


def _notice(message: str) -> None:
    """A one-line notice on stderr (not an error: the run goes on)."""
    print(f"rayflow: note: {message}", file=sys.stderr, flush=True)


def _step_of(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) and v == "<absent>" else json.dumps(v)


def _objective_stem(rank: int) -> str:
    """The file stem of process ``rank``'s objective state in a checkpoint (rank 0 keeps the one-process name)."""
    return "objective" if rank == 0 else f"objective-rank{rank}"


class CheckpointMixin:
    """Writing, rotating, finding and loading checkpoints, and trimming the log on resume. Mixed into
    :class:`~rayflow.training.Trainer`, whose ``__init__`` sets the attributes these methods use (``config``,
    ``accelerator``, ``objective``, ``out_dir``, ``ckpt_dir``, ``full_config``, ``optimizer``, ``lr_scheduler``,
    ``ema``, ``loss_history``, ``raw_model``, ``device``, ``step_graph``)."""

    # ------------------------------------------------------------------ checkpoints
    def _list_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for p in self.ckpt_dir.iterdir():
            step = _step_of(p.name)
            if step is not None and p.is_dir() and (p / "state.json").is_file():
                found.append((step, p))
        return sorted(found)

    def find_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the one ``latest`` names, else the newest complete ``step-*``."""
        latest = self.ckpt_dir / LATEST
        if latest.is_file():
            name = latest.read_text(encoding="utf-8").strip()
            target = self.ckpt_dir / name
            if _step_of(name) is not None and (target / "state.json").is_file():
                return target
        found = self._list_checkpoints()
        return found[-1][1] if found else None

    def _save_checkpoint(self, steps_done: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        name = f"step-{steps_done:07d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".tmp-{name}"
        if acc.is_main_process:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if acc.num_processes > 1 and hasattr(self.objective, "state_dict"):
            # an objective's state may be rank-local (RayFlow's Time Sampler learns from each rank's own losses):
            # every rank writes its own into the checkpoint being assembled, before rank 0 renames it into place
            acc.wait_for_everyone()
            if not acc.is_main_process:
                self._save_objective_state(tmp, acc.process_index)
            acc.wait_for_everyone()
        if acc.is_main_process:
            model_state = saved_state_dict(self.raw_model)  # a LoRA student: the adapter only
            save_safetensors_atomic(model_state, tmp / "model.safetensors", {"format": "pt"})
            if self.ema is not None:
                save_safetensors_atomic(saved_state_dict(self.ema.module), tmp / "ema.safetensors", {
                    "format": "pt", "ema_step": str(self.ema.step), "ema_decay": repr(self.ema.decay)})
            save_state({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict()},
                       tmp / "optimizer.safetensors", tmp / "optimizer.json")
            if hasattr(self.objective, "state_dict"):
                self._save_objective_state(tmp, 0)
            from rayflow import __version__

            write_json_atomic({"step": steps_done, "config": self.full_config, "rayflow_version": __version__,
                               "loss_history": self.loss_history[-_HISTORY:]}, tmp / "state.json")
            fsync_dir(tmp)
            old = None
            if final.exists():  # only after a manual edit of `latest`: keep it until the new one is in place
                old = self.ckpt_dir / f".old-{name}"
                if old.exists():
                    shutil.rmtree(old)
                final.rename(old)
            tmp.rename(final)
            fsync_dir(self.ckpt_dir)
            write_text_atomic(name + "\n", self.ckpt_dir / LATEST)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._rotate(keep_name=name)
        acc.wait_for_everyone()

    def _save_objective_state(self, directory: Path, rank: int) -> None:
        """``objective.safetensors/.json`` (rank 0) or ``objective-rank{r}.safetensors/.json`` (rank ``r``)."""
        stem = _objective_stem(rank)
        try:
            save_state(self.objective.state_dict(), directory / f"{stem}.safetensors", directory / f"{stem}.json")
        except TypeError as exc:
            raise RayflowError(f"the objective's state_dict cannot be saved: {exc}") from exc

    def _rotate(self, keep_name: str) -> None:
        found = [p for _, p in self._list_checkpoints()]
        excess = len(found) - self.config.keep_checkpoints
        for p in found:
            if excess <= 0:
                break
            if p.name != keep_name:
                shutil.rmtree(p, ignore_errors=True)
                excess -= 1

    def _load_checkpoint(self, path: Path) -> int:
        state = read_json(path / "state.json")
        step = state.get("step")
        require(isinstance(step, int) and step >= 0, f"{path / 'state.json'}: no valid \"step\"")
        saved = state.get("config")
        require(isinstance(saved, dict), f"{path / 'state.json'}: no \"config\"")
        diff = _first_difference(_comparable(saved), _comparable(self.full_config))
        if diff is not None:
            key, was, now = diff
            raise RayflowError(
                f"{path}: checkpoint is from another configuration: {key} was {_fmt(was)}, now {_fmt(now)} "
                f"(use another output directory, or delete {self.ckpt_dir} to start over)"
            )
        saved_train = _with_train_defaults(saved).get("train", {})
        changed = [f"{k} {_fmt(saved_train.get(k))} -> {_fmt(self.full_config['train'][k])}"
                   for k in RESUME_NOTICE_TRAIN_KEYS if saved_train.get(k) != self.full_config["train"][k]]
        if changed and self.accelerator.is_main_process:
            _notice(f"resuming {path.name} with {', '.join(changed)}")
        load_weights_strict(self.raw_model, path / "model.safetensors")
        if self.ema is not None:
            ema_file = path / "ema.safetensors"
            if ema_file.is_file():
                load_weights_strict(self.ema.module, ema_file)
                _, meta = load_safetensors_with_metadata(ema_file)
                self.ema.step = int(meta.get("ema_step", step))
            else:  # checkpoint of a run without EMA (cannot happen with matching configs): start from the weights
                self.ema.module.load_state_dict(self.raw_model.state_dict())
                self.ema.step = step
        opt = load_state(path / "optimizer.safetensors", path / "optimizer.json")
        try:
            self.optimizer.load_state_dict(opt["optimizer"])
            self.lr_scheduler.load_state_dict(opt["lr_scheduler"])
        except (KeyError, ValueError, TypeError) as exc:
            raise RayflowError(f"{path / 'optimizer.json'}: cannot restore the optimizer: {exc}") from exc
        self._apply_lr_config()
        self._match_state_layout()
        capturable = self.step_graph and self.device.type == "cuda"
        for group in self.optimizer.param_groups:  # this run's: a captured step needs it, a CPU refuses it
            group["capturable"] = capturable
        history = state.get("loss_history")
        self.loss_history = [float(v) for v in history] if isinstance(history, list) else []
        if hasattr(self.objective, "load_state_dict"):
            # this rank's own state; rank 0's when the checkpoint has none for it (written by fewer processes)
            stem = _objective_stem(self.accelerator.process_index)
            if not (path / f"{stem}.safetensors").is_file():
                stem = _objective_stem(0)
            obj_t = path / f"{stem}.safetensors"
            if obj_t.is_file():
                self.objective.load_state_dict(load_state(obj_t, path / f"{stem}.json"))
        return step

    def _apply_lr_config(self) -> None:
        """After loading an optimizer: the lr, warm-up and schedule are this run's (they may have changed on
        resume), at the restored step count. The saved state carries the old base lr; the schedule's lambda is
        never saved (it is code), so it is already this run's."""
        sched = self.lr_scheduler
        sched.base_lrs = [self.config.lr for _ in sched.base_lrs]
        for group, lr_lambda in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * lr_lambda(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _match_state_layout(self) -> None:
        """Loaded optimizer moments are contiguous; give them their parameter's layout (channels-last weights),
        which the fused AdamW kernel expects."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                        self.optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    # ------------------------------------------------------------------ logging
    def _trim_log(self, step: int) -> None:
        """Drop log lines past the resumed step (they belong to the interrupted continuation)."""
        log = self.out_dir / TRAIN_LOG
        if not log.is_file():
            return
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line)
            except (ValueError, AttributeError, TypeError):
                continue
        write_text_atomic("".join(x + "\n" for x in kept), log)
