"""The frozen teacher's static batch (issue #13): calls cut and padded to a few shapes, so a compiled teacher's CUDA
graphs replay; pools hold the same values whatever the generation batch, and cost the same counted NFEs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from rayflow.errors import RayflowError
from rayflow.models import FrozenTeacher, ModelConfig, build_model, prepare_frozen_teacher
from rayflow.models.speed import static_batch_sizes


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp():
    torch.manual_seed(0)
    return build_model(ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=16, depth=2)).eval()


def test_static_batch_sizes():
    assert static_batch_sizes(2048) == (2048, 1024, 512, 256)
    assert static_batch_sizes(4) == (4, 2, 1)
    assert static_batch_sizes(1) == (1,)


@pytest.mark.parametrize("compiled", [False, True])
def test_calls_are_cut_and_padded_to_the_static_shapes_and_compute_the_same(compiled):
    net = _mlp()
    shapes: list[int] = []

    def recording(x, t, cond):  # stands in for the compiled network: records the batch shapes it is called at
        shapes.append(x.shape[0])
        assert t.shape[0] == x.shape[0] and cond.shape[0] == x.shape[0]
        return net(x, t, cond)

    frozen = FrozenTeacher(net, torch.float32, fn=recording if compiled else None, static_batch=4)
    if not compiled:  # the eager network records its own calls
        frozen.model = frozen._fn = _Recording(net, shapes)
    for n in (1, 3, 4, 5, 9, 13):
        x, t, c = torch.randn(n, 4), torch.randint(0, 1000, (n,)).float(), torch.arange(n) % 3
        out = frozen(x, t, c)
        assert out.shape == (n, 4) and out.dtype == torch.float32
        torch.testing.assert_close(out, net(x, t, c), rtol=1e-6, atol=1e-6)
    assert set(shapes) <= {4, 2, 1}
    # 13 rows: 4 + 4 + 4 + 1; 9 rows: 4 + 4 + 1; 5: 4 + 1; 3 rows padded to 4
    assert shapes == [1, 4, 4, 4, 1, 4, 4, 1, 4, 4, 4, 1]
    # a 0-d timestep and no condition pass through unchanged
    x = torch.randn(3, 4)
    torch.testing.assert_close(frozen(x, torch.tensor(500.0), None), net(x, torch.tensor(500.0), None))


class _Recording(torch.nn.Module):
    def __init__(self, net, shapes):
        super().__init__()
        self.net, self.shapes = net, shapes
        self.prediction_type, self.num_classes = net.prediction_type, net.num_classes

    def forward(self, x, t, cond):
        self.shapes.append(x.shape[0])
        return self.net(x, t, cond)


def test_a_compiled_teacher_with_a_static_batch_compiles_once_per_shape():
    """torch.compile with static shapes (as the CUDA teacher is compiled, here with a counting backend on a CPU):
    ten calls of ten batch sizes compile four graphs (8, 4, 2, 1 rows) and compute what the network does."""
    import torch._dynamo

    from rayflow.models.speed import allow_recompiles

    net = _mlp().requires_grad_(False)
    graphs = []

    def backend(gm, inputs):
        graphs.append(inputs[0].shape[0] if inputs and torch.is_tensor(inputs[0]) else None)
        return gm.forward

    torch._dynamo.reset()
    allow_recompiles()
    try:
        frozen = FrozenTeacher(net, torch.float32, fn=torch.compile(net, backend=backend, dynamic=False),
                               static_batch=8)
        with torch.no_grad():
            for n in (3, 8, 13, 21, 5, 2, 1, 9, 40, 17):
                x, t, c = torch.randn(n, 4), torch.full((n,), 500.0), torch.arange(n) % 3
                torch.testing.assert_close(frozen(x, t, c), net(x, t, c))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 4 and frozen.compiled


def test_release_compiled_state_drops_the_compiled_graphs():
    """After a training's compiled graphs are released, the same compiled call is compiled again (the cached
    graph, and on CUDA its graph memory pool, is gone) and still computes what the network does."""
    import torch._dynamo

    from rayflow.models.speed import release_compiled_state

    net = _mlp().requires_grad_(False)
    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    try:
        fn = torch.compile(net, backend=backend, dynamic=False)
        x, t, c = torch.randn(4, 4), torch.full((4,), 500.0), torch.arange(4) % 3
        with torch.no_grad():
            fn(x, t, c)
            fn(x, t, c)
            assert len(compiles) == 1  # cached
            release_compiled_state()
            torch.testing.assert_close(fn(x, t, c), net(x, t, c))
    finally:
        torch._dynamo.reset()
    assert len(compiles) == 2


def test_static_batch_settings(capsys):
    net = _mlp()
    assert prepare_frozen_teacher(net, "cpu") is net  # auto: only for a compiled teacher, so nothing on a CPU
    frozen = prepare_frozen_teacher(net, "cpu", static_batch=8)  # asked for: the padding runs on a CPU too
    assert isinstance(frozen, FrozenTeacher) and frozen.batch_sizes() == (8, 4, 2, 1) and not frozen.compiled
    assert capsys.readouterr().err == ""
    for bad in (-1, "big", 2.5, True):
        with pytest.raises(RayflowError, match="static_batch must be"):
            prepare_frozen_teacher(_mlp(), "cpu", static_batch=bad)


# ---------------------------------------------------------------------- pools and the generation batch
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny class-conditional UNet teacher on tiny Fashion-MNIST-like data, trained for one step."""
    from rayflow.distillation import train_teacher
    from rayflow.training import TrainConfig
    from test_data import make_mnist_dir

    root = tmp_path_factory.mktemp("teacher-batch")
    (root / "fm").mkdir()
    make_mnist_dir(root / "fm", gz=True, n_train=24, n_test=8)
    train_teacher(f"fashion-mnist:path={root / 'fm'},pad=32", root / "teacher",
                  TrainConfig(max_steps=1, batch_size=4, checkpoint_every=0, log_every=0, progress=False),
                  model=ModelConfig(kind="unet", sample_shape=(1, 32, 32), channels=(4, 8), layers_per_block=1))
    return root / "teacher", root / "fm"


def _context(teacher_dir, tmp_path, gen_batch, guidance=1.0):
    from rayflow.distillation import distill_context
    from rayflow.training import TrainConfig

    teacher, data = teacher_dir
    train = TrainConfig(max_steps=1, batch_size=4, progress=False, log_every=0, checkpoint_every=0)
    return distill_context(str(teacher), f"fashion-mnist:path={data},pad=32", tmp_path / "out", train,
                           guidance=guidance, progress=False, gen_batch=gen_batch)


def _pools(ctx):
    """RayFlow's eps_mu pools (data x0 with the K-point average; the teacher's x0 with the start reading) and 2-RF's
    global pairs, with odd shard and pool sizes so every batch has a remainder."""
    from rayflow import pairs as P
    from rayflow.methods.kit import PairSpec, make_pairs
    from rayflow.methods.rayflow import RayFlowConfig
    from rayflow.methods.rayflow.method import epsilon_teacher
    from rayflow.methods.rayflow.targets import build_pool

    cfg = RayFlowConfig.from_dict(k_timesteps=3, eps_mu_reading="average", pool_size=11, cache_shard_size=7,
                                  teacher_steps=2).targets
    teacher = epsilon_teacher(ctx.teacher, ctx.schedule)
    out = {"data": build_pool(cfg, ctx, teacher, "data", None)}
    cfg = RayFlowConfig.from_dict(pool_size=11, cache_shard_size=7, teacher_steps=3).targets
    out["teacher"] = build_pool(cfg, ctx, teacher, "teacher", None)
    out["pairs"] = make_pairs(ctx, PairSpec("p", 9, seed=11, desc="pairs", steps=2, label_dropout=0.5)).tensors
    out["windows"] = make_pairs(ctx, PairSpec("w", 9, seed=7, desc="w", solver="ddim", steps=2, spacing=None,
                                              windows=P.window_boundaries(2, 1000))).tensors
    return out


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_pools_do_not_depend_on_the_generation_batch(teacher_dir, tmp_path, guidance):
    plain = _context(teacher_dir, tmp_path, "auto", guidance)  # a CPU: each pool's own batch, as before
    assert plain.gen_batch == 0 and not isinstance(plain.teacher.model, FrozenTeacher)
    small = _context(teacher_dir, tmp_path, 3, guidance)  # 3 rows per call: nearly every call cut and padded
    assert small.gen_batch == 3 and small.teacher.model.batch_sizes() == (3, 1)
    a, b = _pools(plain), _pools(small)
    for pool in a:
        assert a[pool].keys() == b[pool].keys()
        for key in a[pool]:
            torch.testing.assert_close(a[pool][key], b[pool][key], rtol=1e-5, atol=1e-5, msg=f"{pool}/{key}")
    # the padding rows are not teacher evaluations: both runs count the same NFEs
    assert plain.teacher.evaluations == small.teacher.evaluations > 0
    assert plain.teacher_nfe == small.teacher_nfe


def test_generation_batch_refusals(teacher_dir, tmp_path):
    for bad in (0, -2, "large", 1.5):
        with pytest.raises(RayflowError, match="gen_batch must be auto or an integer >= 1"):
            _context(teacher_dir, tmp_path, bad)


def test_the_gen_batch_flag(teacher_dir, tmp_path, capsys):
    from rayflow.cli import main

    teacher, data = teacher_dir
    common = ["distill", "--method", "reflow", "--teacher", str(teacher), "--data",
              f"fashion-mnist:path={data},pad=32", "--max-steps", "1", "--batch-size", "2", "--pool-size", "4",
              "--option", "pair_steps=2", "--no-progress", "--checkpoint-every", "0"]
    assert main([*common, "--out", str(tmp_path / "a"), "--gen-batch", "3"]) == 0
    assert "teacher evaluations" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "b"), "--gen-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rayflow: error:") and "--gen-batch" in err
    assert not (tmp_path / "b").exists()


def test_pool_noise_drawn_in_threads_is_each_rows_own_draw():
    """RayFlow's per-row noise (regenerable from each row's seed), drawn by several threads for large shards:
    every row is still ``randn`` of a fresh generator seeded with its seed."""
    from rayflow.methods.rayflow.targets import _noise_from_seeds

    seeds = torch.randint(0, 2**62, (1100,), generator=torch.Generator().manual_seed(3))
    want = torch.stack([torch.randn((1, 2, 3), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    for threads in (None, 1, 3, 7):
        assert torch.equal(_noise_from_seeds(seeds, (1, 2, 3), threads=threads), want), threads
    assert _noise_from_seeds(seeds[:0], (4,)).shape == (0, 4)


def test_compile_network_forces_inductor_layout_optimisation_for_that_model_only(monkeypatch):
    """``compile_network``: the compile mode's own inductor options plus ``force_layout_optimization`` (passed as
    this compilation's options, not set process-wide), or a plain ``torch.compile(mode=...)`` without it."""
    import torch._inductor.config as inductor_config

    from rayflow.models.speed import compile_network

    calls: list[dict] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    net = torch.nn.Conv2d(1, 1, 1)
    assert compile_network(net, "reduce-overhead", force_layout=True) is net
    assert compile_network(net, "default", force_layout=True) is net
    compile_network(net, "reduce-overhead")
    compile_network(net)
    compile_network(net, "reduce-overhead", force_layout=True, dynamic=False)  # the frozen teacher's static shapes
    compile_network(net, "default", kernel_tuning="coordinate-descent")
    with pytest.raises(RayflowError, match="kernel_tuning must be one of none, coordinate-descent"):
        compile_network(net, kernel_tuning="max")
    assert calls == [{"options": {"triton.cudagraphs": True, "force_layout_optimization": True}, "dynamic": None},
                     {"options": {"force_layout_optimization": True}, "dynamic": None},
                     {"mode": "reduce-overhead", "dynamic": None}, {"mode": None, "dynamic": None},
                     {"options": {"triton.cudagraphs": True, "force_layout_optimization": True}, "dynamic": False},
                     {"options": {"coordinate_descent_tuning": True}, "dynamic": None}]
    assert inductor_config.force_layout_optimization is False and inductor_config.coordinate_descent_tuning is False


def test_the_trainer_forces_layout_optimisation_only_for_compiled_cuda_convolutional_networks(tmp_path, capsys):
    """On this CPU the Trainer never forces it; ``layout_optimization`` is validated."""
    from rayflow.schedules import VPSchedule
    from rayflow.training import EpsilonObjective, TrainConfig, Trainer

    cfg = ModelConfig(kind="unet", sample_shape=(1, 8, 8), channels=(4, 8), layers_per_block=1)
    objective = EpsilonObjective(torch.randn(8, 1, 8, 8), None, VPSchedule.linear(), batch_size=4)
    train = TrainConfig(max_steps=1, batch_size=4, lr=1e-3, checkpoint_every=0, log_every=0, progress=False)
    assert not Trainer(build_model(cfg), objective, train, tmp_path / "t", {"kind": "teacher"}).force_layout
    with pytest.raises(RayflowError, match="layout_optimization must be one of force, inductor"):
        TrainConfig(layout_optimization="always")
    with pytest.raises(RayflowError, match="kernel_tuning must be one of none, coordinate-descent"):
        TrainConfig(kernel_tuning="autotune")
    capsys.readouterr()
    tuned = dataclasses.replace(train, kernel_tuning="coordinate-descent")
    Trainer(build_model(cfg), objective, tuned, tmp_path / "u", {"kind": "teacher"})  # a GPU setting: a notice
    assert "kernel_tuning=coordinate-descent tunes Inductor's GPU kernels: ignored on cpu" in capsys.readouterr().err
