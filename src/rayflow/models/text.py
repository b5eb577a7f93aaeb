"""Text conditioning for Stable Diffusion UNets: the condition is a *caption index* into a prompt table.

Every rayflow component that handles conditions - classifier-free guidance, pair caches, label dropout, the
trainer's batches - already handles class labels (``LongTensor [B]``, with ``num_classes`` as the null label).
A text-conditioned model therefore takes the index of a caption as its condition and looks the embeddings up
in a :class:`PromptTable`::

    cond = i            -> encoder_hidden_states = table.embeds[i]        [L, D]
                           (SDXL: added_cond_kwargs text_embeds = table.pooled[i], time_ids = table.time_ids[i])
    cond = N (= null)   -> the unconditional row: the empty prompt's embedding (SD1.5), or zeros when the
                           pipeline sets ``force_zeros_for_empty_prompt`` (SDXL), as diffusers' pipelines do

so CFG (``pred = u + w (c - u)``), caption dropout (index -> ``N``) and the caches (which store indices) need
no change. The table is kept on the CPU and only the rows of a batch are moved to the device, so a table of
many captions does not occupy accelerator memory. Tables live in a process-wide registry keyed by their content
fingerprint, which the model config records (``ModelConfig.sd["table"]``): a network rebuilt by
:func:`rayflow.models.build_model` inside a method finds the table of its run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rayflow.errors import RayflowError, require
from rayflow.models.base import Condition, Denoiser, broadcast_timesteps, check_prediction_type

#: LCM-LoRA's / RayFlow's target modules for SD UNets: attention projections, feed-forwards, resnet convs and
#: time projections. At rank 64 on the SD1.5 UNet this is 67.5M trainable parameters (RayFlow's reported size).
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                        "time_emb_proj")


class StackedRows:
    """The rows of a large (possibly file-backed) tensor followed by those of a small one, read by index without
    joining the two (joining would copy a cache that is meant to stay on disk into memory)."""

    def __init__(self, head: torch.Tensor, tail: torch.Tensor) -> None:
        require(tuple(head.shape[1:]) == tuple(tail.shape[1:]),
                f"stacked rows must match in shape, got {tuple(head.shape)} and {tuple(tail.shape)}")
        self.head, self.tail = head, tail.to(head.dtype)
        self.shape = torch.Size([head.shape[0] + tail.shape[0], *head.shape[1:]])
        self.ndim, self.dtype = head.ndim, head.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        n = self.head.shape[0]
        if isinstance(index, int):
            index = index % len(self)
            return self.head[index] if index < n else self.tail[index - n]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        idx = torch.as_tensor(index).long().reshape(-1)
        out = torch.empty((idx.shape[0], *self.shape[1:]), dtype=self.dtype)
        first = idx < n
        out[first] = self.head[idx[first]]
        out[~first] = self.tail[idx[~first] - n]
        return out


@dataclass
class PromptTable:
    """Encoded captions plus the unconditional row as the last row (index ``num_prompts``).

    ``embeds`` ``[N+1, L, D]``; for SDXL also ``pooled`` ``[N+1, P]`` and ``time_ids`` ``[N+1, 6]``: tensors, or
    :class:`StackedRows` of a file-backed caption cache and the null row (:meth:`with_null`). ``identity``, when
    given, names the content (a cache fingerprint) so the key is not a hash of every byte.
    """

    embeds: torch.Tensor | StackedRows
    pooled: torch.Tensor | StackedRows | None = None
    time_ids: torch.Tensor | StackedRows | None = None
    identity: str | None = None

    def __post_init__(self) -> None:
        n = self.embeds.shape[0]
        require(self.embeds.ndim == 3 and n >= 1,
                f"prompt embeddings must be [N+1, L, D], got {tuple(self.embeds.shape)}")
        for name in ("pooled", "time_ids"):
            t = getattr(self, name)
            require(t is None or t.shape[0] == n, f"prompt table: {name} has {None if t is None else t.shape[0]} "
                                                  f"rows, embeds {n}")
        self.key = self._fingerprint()
        #: the table copied to an accelerator once per (device, dtype) (None: too large, rows gathered on the host)
        self._resident: dict[tuple[str, torch.dtype], dict[str, torch.Tensor] | None] = {}

    @classmethod
    def with_null(cls, captions: dict[str, torch.Tensor], null: dict[str, torch.Tensor],
                  identity: str) -> PromptTable:
        """A table of (possibly file-backed) caption tensors ``embeds``/``pooled``/``time_ids`` ``[N, ...]`` and
        the null row ``[1, ...]`` of each, stacked without copying the captions."""
        parts = {k: StackedRows(captions[k], null[k]) for k in ("embeds", "pooled", "time_ids") if k in captions}
        return cls(**parts, identity=identity)

    def __deepcopy__(self, memo: dict) -> PromptTable:
        # read-only data: a deep copy of a network (its EMA shadow) shares the table rather than copying it
        return self

    @property
    def num_prompts(self) -> int:
        """``N``, the number of real captions (the null row is index ``N``)."""
        return self.embeds.shape[0] - 1

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.identity is not None:  # the captions' identity is given: hash it and the small null rows only
            h.update(self.identity.encode())
        for t in (self.embeds, self.pooled, self.time_ids):
            if t is None:
                continue
            h.update(str(tuple(t.shape)).encode())
            if self.identity is not None:
                t = t[len(t) - 1] if isinstance(t, StackedRows) else t[-1]
            h.update(t.detach().float().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def rows(self, index: torch.Tensor, device: torch.device, dtype: torch.dtype,
             resident: bool | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning inputs for caption indices ``index`` ``[B]``.

        Off the CPU (``resident=None``) a table of at most :data:`RESIDENT_BYTES` is copied to ``device`` in
        ``dtype`` once and its rows are gathered there: the indices (drawn on the device by the trainer's pools)
        are not read back by the host, and no embeddings cross the bus per step. The profile of the SD LoRA step
        showed one host read of the indices per student call (a stall of the whole queue on a GPU) and a blocking
        copy of the gathered rows. Indices already on the host are range-checked (free); indices on the device
        come from the run's own pools and are bounds-checked by the gather itself. Larger tables (a file-backed
        caption cache) stay on the host and rows are gathered there. ``resident=True`` forces the device copy (a
        CPU test of it), ``False`` the host path.
        """
        device = torch.device(device)
        table = self._on_device(device, dtype) if (device.type != "cpu" if resident is None else resident) else None
        if table is None or index.device.type == "cpu":
            idx = index.long().cpu()  # a host read when the indices are on a device and the table is not
            require(bool(((idx >= 0) & (idx <= self.num_prompts)).all()),
                    f"caption index out of range 0..{self.num_prompts}")
        if table is not None:
            idx = index.to(device=device, dtype=torch.long, non_blocking=True)
            out = {"encoder_hidden_states": table["embeds"][idx]}
            if "pooled" in table:
                out["added_cond_kwargs"] = {"text_embeds": table["pooled"][idx], "time_ids": table["time_ids"][idx]}
            return out
        out = {"encoder_hidden_states": self.embeds[idx].to(device=device, dtype=dtype)}
        if self.pooled is not None:
            out["added_cond_kwargs"] = {"text_embeds": self.pooled[idx].to(device=device, dtype=dtype),
                                        "time_ids": self.time_ids[idx].to(device=device, dtype=dtype)}
        return out

    def _on_device(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The whole table on ``device`` in ``dtype`` (copied on first use), or None when it is over
        :data:`RESIDENT_BYTES` there."""
        key = (str(device), dtype)
        if key not in self._resident:
            parts = {name: t for name in ("embeds", "pooled", "time_ids")
                     if (t := getattr(self, name)) is not None}
            size = sum(t.shape.numel() for t in parts.values()) * torch.empty((), dtype=dtype).element_size()
            self._resident[key] = None if size > RESIDENT_BYTES else {
                # a StackedRows (file-backed captions + null row) is read whole once, by index
                name: (t[torch.arange(len(t))] if isinstance(t, StackedRows) else t).to(device=device, dtype=dtype)
                for name, t in parts.items()}
        return self._resident[key]


#: the largest prompt table kept on an accelerator (per dtype); larger ones are gathered on the host per batch
RESIDENT_BYTES = 1 << 30

_TABLES: dict[str, PromptTable] = {}


def register_prompt_table(table: PromptTable) -> str:
    """Make ``table`` findable by its key (what ``ModelConfig.sd["table"]`` records); returns the key."""
    _TABLES[table.key] = table
    return table.key


def get_prompt_table(key: str | None) -> PromptTable | None:
    return _TABLES.get(key) if key else None


class TextUNetDenoiser(Denoiser):
    """A diffusers ``UNet2DConditionModel`` with caption-index conditions (module doc); LoRA via peft.

    ``forward(x, t, cond)``: ``cond`` is ``LongTensor [B]`` of caption indices (``None`` = the null row). The
    UNet runs in its own parameter dtype (a frozen bf16 teacher) and the output is returned in ``x``'s dtype.
    """

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon", table: PromptTable | None = None,
                 base: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        #: where the frozen base weights of a LoRA student come from (``{"pipeline", "fingerprint"}``); they are
        #: then left out of saved files (:meth:`reference_keys`), None: everything is saved
        self.base = base
        self.table: PromptTable | None = None
        self.num_classes = 0
        if table is not None:
            self.set_prompt_table(table)

    def set_prompt_table(self, table: PromptTable) -> None:
        """Use ``table`` for conditions (``num_classes`` becomes its caption count; wrap the model *after*)."""
        self.table = table
        self.num_classes = table.num_prompts

    def reference_keys(self) -> list[str]:
        """state_dict keys not saved (see :mod:`rayflow.checkpoint`): with a ``base`` reference, every non-LoRA
        weight, which :func:`build_sd_denoiser` reads back from the teacher pipeline's ``unet/`` folder."""
        if not self.base:
            return []
        return [k for k in self.state_dict() if not _is_lora_key(k)]

    def fingerprint(self) -> str:
        """Included by :func:`rayflow.caches.model_fingerprint`: caches made with other captions differ."""
        return "" if self.table is None else self.table.key

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        if self.table is None:
            raise RayflowError("a text-conditioned UNet needs a prompt table (set_prompt_table) before use")
        t = broadcast_timesteps(t, x.shape[0], x.device)
        if cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        dtype = self.unet.dtype
        kwargs = self.table.rows(cond, x.device, dtype)
        out = self.unet(x.to(dtype), t, **kwargs).sample
        return out.to(x.dtype)

    def null_condition(self, batch_size: int, device: torch.device) -> Condition:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None,
             target_modules: tuple[str, ...] | list[str] = DEFAULT_LORA_TARGETS) -> dict[str, Any]:
    """Inject a peft LoRA adapter into ``unet`` (freezing the base weights); returns its JSON description.

    ``W x -> W x + (alpha / r) B A x`` with ``A`` Gaussian and ``B = 0`` (diffusers' training scripts'
    ``init_lora_weights="gaussian"``), so the student starts exactly at the teacher. Target names that match
    no module of this UNet are dropped (peft refuses a list where one name matches nothing).
    """
    from peft import LoraConfig

    require(int(rank) >= 1, f"--lora-rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    require(alpha > 0, f"--lora-alpha must be > 0, got {alpha}")
    names = [n for n, _ in unet.named_modules()]
    present = [m for m in target_modules if any(n == m or n.endswith("." + m) for n in names)]
    require(bool(present), f"none of the LoRA target modules {list(target_modules)} exists in this UNet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=present))
    return {"rank": int(rank), "alpha": alpha, "target_modules": present}


def _is_lora_key(key: str) -> bool:
    return "lora_" in key or "lora_magnitude_vector" in key


def unet_fingerprint(unet: nn.Module) -> str:
    """A short blake2b of a UNet's non-LoRA weights (names, dtypes and bytes): the identity of a LoRA student's
    base, recorded at distillation and checked whenever the base is read back from the teacher's folder."""
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in sorted(unet.state_dict().items()):
        if _is_lora_key(name):
            continue
        h.update(f"{name.replace('.base_layer.', '.')}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_base_unet(base: dict[str, Any]) -> nn.Module:
    """The teacher's UNet from ``base["pipeline"]/unet`` (local files only), checked against the recorded
    ``base["fingerprint"]``: a LoRA is only the student on exactly the weights it was trained on."""
    from diffusers import UNet2DConditionModel

    folder = Path(str(base.get("pipeline", ""))) / "unet"
    require(folder.is_dir(), f"the LoRA student's base UNet {folder} is missing (its teacher pipeline folder was "
                             "moved or deleted); a LoRA-only student needs the teacher it was trained on")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise RayflowError(f"{folder}: cannot load the LoRA student's base UNet ({str(exc).splitlines()[0]})") from exc
    found = unet_fingerprint(unet)
    require(base.get("fingerprint") in (None, found),
            f"{folder}: the teacher UNet has changed since the student was trained (fingerprint {found}, "
            f"recorded {base.get('fingerprint')}); the LoRA would not reproduce the student")
    return unet


def build_sd_denoiser(config: Any) -> TextUNetDenoiser:
    """The network of a ``ModelConfig(kind="sd")``: a UNet from ``unet_config`` (or, for a LoRA student with a
    ``sd["base"]`` reference, the teacher's UNet read from its pipeline folder), LoRA per ``sd["lora"]``,
    gradient checkpointing per ``sd["gradient_checkpointing"]``, the registered table ``sd["table"]``."""
    from diffusers import UNet2DConditionModel

    sd = dict(config.sd)
    base = sd.get("base")
    lora = sd.get("lora")
    require(not base or bool(lora), "a base reference applies to LoRA students only")
    unet = load_base_unet(base) if base else UNet2DConditionModel.from_config(config.unet_config)
    if lora:
        add_lora(unet, lora["rank"], lora["alpha"], tuple(lora["target_modules"]))
    if sd.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    model = TextUNetDenoiser(unet, config.prediction_type, get_prompt_table(sd.get("table")), base=base or None)
    model.config = config
    return model


def lora_state_dict(model: TextUNetDenoiser) -> dict[str, torch.Tensor]:
    """peft's adapter state dict of the UNet (keys without the adapter name), for ``lora.safetensors``."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model.unet).items()}


__all__ = ["DEFAULT_LORA_TARGETS", "PromptTable", "StackedRows", "TextUNetDenoiser", "add_lora", "build_sd_denoiser",
           "load_base_unet", "unet_fingerprint",
           "get_prompt_table", "lora_state_dict", "register_prompt_table"]
