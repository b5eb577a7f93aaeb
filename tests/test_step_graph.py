"""The whole-step CUDA graph (rayflow.training.step_graph): its body against the ordinary loop on the CPU, the
reasons it falls back, and (on a GPU) captured steps against eager ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayflow.errors import RayflowError
from rayflow.models import ModelConfig, build_model
from rayflow.schedules import VPSchedule
from rayflow.training import EpsilonObjective, LossOutput, TrainConfig, Trainer
from rayflow.training.ema import EMA
from rayflow.training.step_graph import StepGraph, step_graph_blocker

#: tests of the step's body run eagerly on a CPU; on a GPU machine the Trainer captures, which the GPU tests cover
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU test (the Trainer would capture on a GPU)")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
MODEL_CFG = ModelConfig(kind="mlp", sample_shape=(2,), hidden=32, depth=2, num_classes=2)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _data(n: int = 256):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    return means[labels] + 0.3 * torch.randn(n, 2, generator=g), labels


def _trainer(out: Path, graph_body: bool | None, **kw) -> Trainer:
    x, y = _data()
    objective = EpsilonObjective(x, y, VPSchedule.linear(1000), batch_size=64, label_dropout=0.1, num_classes=2)
    base = dict(max_steps=30, lr=3e-3, weight_decay=0.01, warmup_steps=5, lr_schedule="cosine", grad_clip=0.5,
                ema_decay=0.9, seed=3, checkpoint_every=10, log_every=1, progress=False, step_graph="no")
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    trainer = Trainer(model, objective, TrainConfig(**{**base, **kw}), out, {"model": MODEL_CFG.to_dict()})
    if graph_body is not None:  # on a CPU: the captured step's body, run eagerly (nothing is captured)
        trainer.step_graph = graph_body
    return trainer


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.raw_model.parameters()]


@cpu_only
def test_the_graph_body_trains_as_the_ordinary_loop(tmp_path):
    """Tensor lr (a warm-up and a cosine schedule), clipping, AdamW with weight decay and the tensor-weighted EMA
    give the ordinary loop's losses, weights and EMA."""
    eager = _trainer(tmp_path / "eager", graph_body=False)
    eager_ema = eager.train()
    body = _trainer(tmp_path / "body", graph_body=True)
    body_ema = body.train()
    assert _losses(tmp_path / "body") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-5, abs=1e-7)
    for a, b in zip(_weights(body), _weights(eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(body_ema.parameters(), eager_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert body.ema.step == eager.ema.step == 30
    assert body.optimizer.param_groups[0]["lr"] == eager.optimizer.param_groups[0]["lr"]  # a float again


@cpu_only
def test_the_graph_body_resumes_from_its_checkpoint(tmp_path):
    _check_resume(tmp_path, graph_body=True)


def _check_resume(tmp_path: Path, graph_body: bool | None, **kw) -> None:
    constant = {"lr_schedule": "constant"}  # (a cosine schedule would end at the shorter run's max_steps)
    full = _trainer(tmp_path / "full", graph_body=graph_body, **constant, **kw)
    full.train()
    part = _trainer(tmp_path / "part", graph_body=graph_body, max_steps=20, **constant, **kw)
    part.train()
    resumed = _trainer(tmp_path / "part", graph_body=graph_body, **constant, **kw)  # resumes at step 20
    resumed.train()
    assert _losses(tmp_path / "part")[20:] == pytest.approx(_losses(tmp_path / "full")[20:], rel=1e-5, abs=1e-7)
    for a, b in zip(_weights(resumed), _weights(full)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ema_update_with_a_tensor_weight_equals_update():
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    a, b = EMA(model, 0.9), EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    a.update(model)
    b.update_with(model, torch.tensor(1.0 - b.current_decay()))
    for x, y in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert (a.step, b.step) == (1, 0)  # update_with leaves the counting to its caller


def test_step_graph_refills_its_values_only_when_they_change():
    calls = []

    def body(step, generator):
        calls.append((step, torch.rand(1, generator=generator).item()))
        return torch.zeros(()), None, {}

    graph = StepGraph(body, torch.device("cpu"), lr=0.1, ema_weight=0.5, before_capture=lambda: None, capture=False)
    lr = graph.lr
    graph.set_values(0.2, 0.5)
    assert graph.lr is lr and float(graph.lr) == pytest.approx(0.2) and float(graph.ema_weight) == 0.5
    graph(0, seed=11)
    graph(1, seed=11)
    assert calls[0][1] == calls[1][1]  # each call reseeds the generator
    assert not graph.captured


class _HostObjective:
    def __call__(self, model, step, generator):
        return LossOutput(torch.zeros((), requires_grad=True))


def test_step_graph_blocker_names_each_reason():
    x, y = _data()
    capturable = EpsilonObjective(x, y, VPSchedule.linear(1000), batch_size=8, num_classes=2)
    assert capturable.capturable
    cuda = torch.device("cuda")
    ok = dict(device=cuda, num_processes=1, accumulation=1, mixed_precision="bf16", objective=capturable)
    assert step_graph_blocker(**ok) is None
    assert "GPU" in step_graph_blocker(**{**ok, "device": torch.device("cpu")})
    assert "multi-process" in step_graph_blocker(**{**ok, "num_processes": 2})
    assert "gradient_accumulation_steps" in step_graph_blocker(**{**ok, "accumulation": 2})
    assert "fp16" in step_graph_blocker(**{**ok, "mixed_precision": "fp16"})
    assert "_HostObjective is not capturable" in step_graph_blocker(**{**ok, "objective": _HostObjective()})


@cpu_only
def test_step_graph_yes_on_a_cpu_falls_back_with_a_notice(tmp_path, capsys):
    x, y = _data()
    objective = EpsilonObjective(x, y, VPSchedule.linear(1000), batch_size=8, num_classes=2)
    trainer = Trainer(build_model(MODEL_CFG), objective, TrainConfig(max_steps=2, step_graph="yes", progress=False,
                                                                      checkpoint_every=0), tmp_path, {})
    assert not trainer.step_graph
    err = capsys.readouterr().err
    assert "step_graph=yes" in err and "need a GPU" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(RayflowError, match="step_graph must be one of"):
        TrainConfig(step_graph="always")


@gpu_only
def test_captured_steps_train_as_eager_steps_on_a_gpu(tmp_path):
    """Steps 0-2 eager (warm-up), 3 captured, 4-29 replayed: the same losses and weights as eager steps (the
    draws come from the registered generator, reseeded before each replay)."""
    kw = dict(mixed_precision="no", compile="no")
    eager = _trainer(tmp_path / "eager", graph_body=None, **kw)
    assert not eager.step_graph
    eager.train()
    graph = _trainer(tmp_path / "graph", graph_body=None, **{**kw, "step_graph": "yes"})
    assert graph.step_graph
    graph.train()
    assert graph.stats.get("step_graph_captured_at") == 3
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "eager"), rel=1e-4, abs=1e-6)
    for a, b in zip(_weights(graph), _weights(eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@gpu_only
def test_a_captured_run_resumes_as_an_uninterrupted_one_on_a_gpu(tmp_path):
    """Both runs capture (the resumed one at step 23, after its own warm-up), with the optimizer state saved from
    a capturable AdamW and loaded into one."""
    _check_resume(tmp_path, graph_body=None, mixed_precision="no", compile="no", step_graph="yes")


@gpu_only
def test_compiled_bf16_captured_steps_follow_eager_steps_on_a_gpu(tmp_path):
    """The benchmark's settings (torch.compile, bf16): captured at step 3, close to eager steps (two compilations
    differ in the last bits, so the tolerance is bf16's)."""
    kw = dict(mixed_precision="bf16", compile="yes", compile_mode="reduce-overhead")
    eager = _trainer(tmp_path / "eager", graph_body=None, **{**kw, "step_graph": "no"})
    assert eager.cuda_graphs and not eager.step_graph
    eager.train()
    graph = _trainer(tmp_path / "graph", graph_body=None, **{**kw, "step_graph": "auto"})
    assert graph.step_graph and not graph.cuda_graphs
    graph.train()
    assert "step_graph_failed" not in graph.stats, graph.stats.get("step_graph_failed_traceback")
    assert graph.stats.get("step_graph_captured_at") == 3
    assert _losses(tmp_path / "graph") == pytest.approx(_losses(tmp_path / "eager"), rel=2e-2, abs=1e-3)
