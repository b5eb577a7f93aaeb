"""What a checkpoint holds when part of a network is frozen: the EMA shares frozen weights, and modules that name
reference keys have them left out of saved files (and accepted back without them)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rayflow.checkpoint import load_weights_strict, reference_keys, save_model_dir, saved_state_dict
from rayflow.errors import RayflowError
from rayflow.training import EMA


class Frozen(torch.nn.Module):
    """A frozen 'base' and a trainable 'head'; the base is rebuilt from elsewhere (here: the seed)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(3, 3).requires_grad_(False)
        self.head = torch.nn.Linear(3, 1)

    def reference_keys(self) -> list[str]:
        return ["base.weight", "base.bias"]


def test_ema_shares_frozen_parameters_and_copies_trainable_ones():
    model = Frozen()
    ema = EMA(model, 0.9)
    assert ema.module.base.weight is model.base.weight  # no second copy of the frozen part
    assert ema.module.head.weight is not model.head.weight
    with torch.no_grad():
        model.head.weight.add_(1.0)
    before = ema.module.head.weight.clone()
    ema.update(model)
    assert not torch.equal(ema.module.head.weight, before)


def test_reference_keys_are_left_out_and_accepted_back(tmp_path):
    outer = torch.nn.Sequential(Frozen())
    assert reference_keys(outer) == {"0.base.weight", "0.base.bias"}
    assert set(saved_state_dict(outer)) == {"0.head.weight", "0.head.bias"}
    net = Frozen()
    with torch.no_grad():
        net.head.weight.fill_(0.5)
    save_model_dir(tmp_path, net, {"model": {}})
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"head.weight", "head.bias"}
    fresh = Frozen()
    load_weights_strict(fresh, tmp_path / "model.safetensors")
    assert torch.equal(fresh.head.weight, net.head.weight) and torch.equal(fresh.base.weight, net.base.weight)
    # a key the module does not name as a reference is still required
    from safetensors.torch import save_file
    save_file({"head.weight": net.head.weight.detach()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RayflowError, match="missing key 'head.bias'"):
        load_weights_strict(fresh, tmp_path / "partial.safetensors")


def test_cli_checkpoint_limit_and_accumulation_reach_the_train_config(capsys):
    from rayflow.cli import _train_config, build_parser, main

    args = build_parser().parse_args(["distill", "--method", "reflow", "--teacher", "t", "--data", "d", "--out", "o",
                                      "--checkpoints-total-limit", "3", "--gradient-accumulation-steps", "4"])
    cfg = _train_config(args)
    assert cfg.keep_checkpoints == 3 == cfg.checkpoints_total_limit and cfg.gradient_accumulation_steps == 4
    assert cfg.layout_optimization == "force"  # the default; the flag reaches the config
    args = build_parser().parse_args(["distill", "--method", "reflow", "--teacher", "t", "--data", "d", "--out", "o",
                                      "--layout-optimization", "inductor", "--kernel-tuning", "coordinate-descent"])
    assert _train_config(args).layout_optimization == "inductor"
    assert _train_config(args).kernel_tuning == "coordinate-descent" and cfg.kernel_tuning == "none"
    assert main(["distill", "--method", "reflow", "--teacher", "t", "--data", "d", "--out", "o",
                 "--checkpoints-total-limit", "0"]) == 2
    assert "rayflow: error:" in capsys.readouterr().err
