"""rayflow.models.speed: the channels-last layout fixes change no value the network computes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rayflow.models import ModelConfig, build_model, to_channels_last
from rayflow.models.speed import keep_channels_last, nearest_upsample_2x


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="unet", sample_shape=(1, 16, 16), num_classes=3, channels=(8, 16, 16),
                                   layers_per_block=1, attention=False))


def test_nearest_upsample_2x_is_the_interpolation_and_its_gradient() -> None:
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    y = nearest_upsample_2x(x)
    ref = F.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.equal(y, ref)
    w = torch.randn_like(ref)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)
    # the gradient is the 2x2 block sum of the output's gradient
    torch.testing.assert_close(g, w.reshape(3, 4, 5, 2, 6, 2).sum((3, 5)), rtol=0, atol=1e-6)


def test_keep_channels_last_changes_no_value_and_is_idempotent() -> None:
    plain = _unet()
    fixed = copy.deepcopy(plain)
    groups = sum(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    upsamplers = sum(type(m).__name__ == "Upsample2D" for m in fixed.modules())
    assert groups > 0 and upsamplers > 0
    assert keep_channels_last(fixed) == groups + upsamplers
    assert keep_channels_last(fixed) == 0  # already changed: left alone
    assert keep_channels_last(copy.deepcopy(fixed)) == 0  # a deep copy keeps the hooks
    to_channels_last(fixed)  # calls keep_channels_last again: still one hook per layer
    assert all(len(m._forward_pre_hooks) == 1 for m in fixed.modules()
               if isinstance(m, nn.GroupNorm) or type(m).__name__ == "Upsample2D")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 16, 16, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g).float()
    c = torch.randint(0, 3, (6,), generator=g)
    out_plain, out_fixed = plain(x, t, c), fixed(x, t, c)
    torch.testing.assert_close(out_fixed, out_plain, rtol=0, atol=1e-6)
    out_plain.square().mean().backward()
    out_fixed.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fixed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_group_norm_hands_its_input_gradient_back_channels_last() -> None:
    norm = nn.GroupNorm(2, 8)
    keep_channels_last(norm)
    x = torch.randn(3, 8, 5, 5, requires_grad=True)  # NCHW
    (grad,) = torch.autograd.grad(norm(x).square().sum(), x)  # as handed back (a leaf's .grad takes its layout)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    reference = nn.GroupNorm(2, 8)
    (grad_ref,) = torch.autograd.grad(reference(x).square().sum(), x)
    assert not grad_ref.is_contiguous(memory_format=torch.channels_last)  # what the hook changes
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-6)
    with torch.no_grad():  # inference: the hook leaves the input alone
        assert torch.equal(norm(x), reference(x))


@pytest.mark.parametrize("output_size", [None, (9, 11)])
def test_upsample_hook_matches_diffusers(output_size: tuple[int, int] | None) -> None:
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    plain = Upsample2D(4, use_conv=True)
    fixed = copy.deepcopy(plain)
    assert keep_channels_last(fixed) == 1 and not fixed.interpolate
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(fixed(x, output_size), plain(x, output_size), rtol=0, atol=1e-6)
    torch.testing.assert_close(fixed(x, output_size=output_size), plain(x, output_size=output_size),
                               rtol=0, atol=1e-6)


def test_compiled_backward_hands_convolutions_channels_last_gradients() -> None:
    """The backward graph torch.compile builds (with Inductor's decompositions): every convolution's output
    gradient is channels-last, except the channel slices of a concatenation's gradient (diffusers' skip
    connections); without the fixes the upsamplers' gradients reach the convolutions before them in NCHW."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    def layouts(model: nn.Module) -> tuple[int, int]:
        graphs: list[torch.fx.GraphModule] = []

        def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
            def keep(g: torch.fx.GraphModule, _: list) -> object:
                graphs.append(g)
                return make_boxed_func(g.forward)
            return aot_module_simplified(gm, inputs, fw_compiler=lambda g, _: make_boxed_func(g.forward),
                                         bw_compiler=keep, decompositions=select_decomp_table())

        torch._dynamo.reset()
        x = torch.randn(2, 1, 16, 16)
        torch.compile(model, backend=backend)(x, torch.tensor([3.0, 500.0]), torch.tensor([0, 2])).sum().backward()
        nchw = sliced = 0
        for node in graphs[0].graph.nodes:
            if node.target == torch.ops.aten.convolution_backward.default:
                grad = node.args[0]
                if grad.meta["val"].shape[1] > 1 and not grad.meta["val"].is_contiguous(
                        memory_format=torch.channels_last):
                    nchw += 1
                    sliced += grad.target == torch.ops.aten.slice.Tensor
        return nchw, sliced

    plain = _unet().to(memory_format=torch.channels_last)
    fixed = to_channels_last(_unet())
    nchw, sliced = layouts(fixed)
    assert nchw == sliced
    assert layouts(plain)[0] > nchw


@pytest.mark.parametrize("size", [8, 9])  # 9: the UNet hands its upsamplers an explicit output size
def test_keep_channels_last_on_a_text_conditioned_unet(size: int) -> None:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    plain = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 cross_attention_dim=32, attention_head_dim=(2, 4))
    fixed = to_channels_last(copy.deepcopy(plain))
    assert sum(getattr(m, "_rayflow_layout_hook", False) for m in fixed.modules()) > 0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, size, size, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([10, 700])
    out_plain, out_fixed = plain(x, t, text).sample, fixed(x, t, text).sample
    torch.testing.assert_close(out_fixed, out_plain, rtol=1e-5, atol=1e-5)
    out_plain.square().mean().backward()
    out_fixed.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fixed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
