"""The trainer's exponential moving average of the weights."""

from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of a model's trainable parameters, as a full shadow copy of the module.

    ``shadow <- lerp(shadow, param, 1 - d_n)`` with one ``torch._foreach_lerp_`` over all parameters and
    diffusers' default decay warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` (``n`` = updates so far), so short
    runs are not dominated by the initial weights. Buffers are copied; frozen parameters are shared with the
    model, not copied. The shadow module's ``state_dict()`` is what gets saved.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.step = 0
        # frozen parameters never change: the shadow shares them instead of copying (a LoRA student's EMA then
        # costs the adapter's size, not a second UNet)
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo=frozen).eval().requires_grad_(False)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._pairs: tuple[int, list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]] | None
        self._pairs = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.step) / (10 + self.step))

    def _lists(self, model: torch.nn.Module):
        # the (source, shadow) tensor lists are built once per model: rebuilding name dicts every step costs
        # host time on networks with hundreds of parameters
        if self._pairs is None or self._pairs[0] != id(model):
            params = dict(model.named_parameters())
            shadow = dict(self.module.named_parameters())
            src = [params[n] for n in self._names]
            dst = [shadow[n] for n in self._names]
            buffers = [(b_dst, b_src) for (_, b_dst), (_, b_src) in zip(self.module.named_buffers(),
                                                                         model.named_buffers())]
            self._pairs = (id(model), src, dst, buffers)
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        src, dst, buffers = self._lists(model)
        if dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.current_decay())  # under no_grad: no detach needed
        for b_dst, b_src in buffers:
            b_dst.copy_(b_src)
        self.step += 1

    @torch.no_grad()
    def update_with(self, model: torch.nn.Module, weight: torch.Tensor) -> None:
        """:meth:`update` with the weight ``1 - d_n`` read from a 0-d device tensor instead of the host, so that a
        CUDA graph can replay it: ``shadow += weight (param - shadow)``. Does not advance :attr:`step` (the
        caller counts the replays)."""
        src, dst, buffers = self._lists(model)
        if dst:
            diff = torch._foreach_sub(src, dst)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(dst, diff)
        for b_dst, b_src in buffers:
            b_dst.copy_(b_src)
