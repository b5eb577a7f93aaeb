"""The shared trainer: exact resume, crash-safe checkpoints, config checks, NaN handling, the teacher loss."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from rayflow.checkpoint import load_model_dir, load_safetensors
from rayflow.errors import RayflowError
from rayflow.models import Denoiser, ModelConfig, build_model
from rayflow.schedules import VPSchedule
from rayflow.training import (
    EpsilonObjective,
    LossOutput,
    TrainConfig,
    Trainer,
    resolve_compile,
    resolve_mixed_precision,
    step_seed,
    unwrap_denoiser,
)

MODEL_CFG = ModelConfig(kind="mlp", sample_shape=(2,), hidden=16, depth=1)


def _model(cfg: ModelConfig = MODEL_CFG) -> Denoiser:
    torch.manual_seed(123)
    return build_model(cfg)



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield

class ToyObjective:
    """Regress sin(3x) with generator-drawn data; has state and an after_step that draws from the generator."""

    def __init__(self, nan_at: int | None = None, crash_at: int | None = None) -> None:
        self.buf = torch.zeros(3)
        self.calls = 0
        self.nan_at, self.crash_at = nan_at, crash_at

    def __call__(self, model, step, generator):
        self.calls += 1
        if step == self.crash_at:
            raise KeyboardInterrupt
        x = torch.randn(16, 2, generator=generator, device=generator.device)
        t = torch.randint(0, 100, (16,), generator=generator, device=generator.device).float()
        loss = (model(x, t) - torch.sin(3 * x)).square().mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        return LossOutput(loss, {"xmean": float(x.mean())})

    def after_step(self, model, step, generator):
        self.buf += torch.rand(3, generator=generator)
        return {"buf": float(self.buf.sum())}

    def state_dict(self):
        return {"buf": self.buf.clone(), "meta": {"pair": (1, 2)}}

    def load_state_dict(self, d):
        assert d["meta"]["pair"] == (1, 2)
        self.buf = d["buf"].clone()


def _config(**kw) -> TrainConfig:
    base = dict(max_steps=40, lr=3e-3, weight_decay=0.01, warmup_steps=5, grad_clip=0.5, ema_decay=0.9,
                seed=7, checkpoint_every=10, keep_checkpoints=2, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _train(out: Path, objective=None, run_config=None, **kw):
    objective = objective or ToyObjective()
    trainer = Trainer(_model(), objective, _config(**kw), out, run_config or {"model": MODEL_CFG.to_dict()})
    return trainer, trainer.train(), objective


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- configuration
def test_train_config_round_trip_and_validation():
    cfg = _config()
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(RayflowError, match=r"unknown keys \['lrr'\]"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(RayflowError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(RayflowError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(RayflowError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=0)


def test_resolve_mixed_precision_and_compile():
    for mp, cpu, cuda in [("auto", "no", "bf16"), ("no", "no", "no"), ("bf16", "bf16", "bf16")]:
        assert resolve_mixed_precision(TrainConfig(mixed_precision=mp), "cpu") == cpu
        assert resolve_mixed_precision(TrainConfig(mixed_precision=mp), torch.device("cuda", 1)) == cuda
    assert resolve_mixed_precision(TrainConfig(mixed_precision="fp16"), "cuda:0") == "fp16"
    with pytest.raises(RayflowError, match="fp16 needs a GPU"):
        resolve_mixed_precision(TrainConfig(mixed_precision="fp16"), "cpu")
    assert resolve_compile(TrainConfig(compile="auto"), "cuda") is True
    assert resolve_compile(TrainConfig(compile="auto"), torch.device("cpu")) is False
    assert resolve_compile(TrainConfig(compile="yes"), "cpu") is True
    assert resolve_compile(TrainConfig(compile="no"), "cuda:0") is False
    bad = TrainConfig()
    bad.compile = "maybe"
    with pytest.raises(RayflowError, match="compile"):
        resolve_compile(bad, "cpu")


def test_step_seed_is_stable_and_distinct():
    seeds = {step_seed(s, k, r) for s in range(3) for k in range(200) for r in range(4)}
    assert len(seeds) == 3 * 200 * 4
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3) and 0 <= step_seed(1, 2, 3) < 2**63


def test_unwrap_denoiser_strips_data_parallel():
    m = _model()
    assert unwrap_denoiser(torch.nn.DataParallel(m)) is m and unwrap_denoiser(m) is m


def test_precision_can_change_between_runs_in_one_process(tmp_path):
    from accelerate.state import AcceleratorState

    try:
        _train(tmp_path / "fp32", max_steps=2)
        trainer, final, _ = _train(tmp_path / "bf16", max_steps=3, mixed_precision="bf16")  # CPU autocast
        assert trainer.mixed_precision == "bf16" and next(final.parameters()).dtype == torch.float32
        assert load_model_dir(tmp_path / "bf16")[1]["steps_done"] == 3
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)  # leave no bf16 state to later tests


# ---------------------------------------------------------------------- exact resume
def test_resume_is_bit_identical(tmp_path):
    _, straight, obj_a = _train(tmp_path / "a", max_steps=40)
    t1, _, _ = _train(tmp_path / "b", max_steps=20)
    t2, resumed, obj_b = _train(tmp_path / "b", max_steps=40)
    assert obj_b.calls == 20  # only the missing steps ran
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name  # EMA weights
    raw_a = load_safetensors(tmp_path / "a/checkpoints/step-0000040/model.safetensors")
    raw_b = load_safetensors(tmp_path / "b/checkpoints/step-0000040/model.safetensors")
    assert raw_a.keys() == raw_b.keys() and all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    assert torch.equal(obj_a.buf, obj_b.buf)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    for name in ("optimizer.safetensors", "ema.safetensors", "objective.safetensors"):
        a = load_safetensors(tmp_path / "a/checkpoints/step-0000040" / name)
        b = load_safetensors(tmp_path / "b/checkpoints/step-0000040" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _log_steps(tmp_path / "b") == list(range(1, 41))


def test_interrupted_run_resumes_exactly_and_trims_the_log(tmp_path):
    _, straight, _ = _train(tmp_path / "a", max_steps=30)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", objective=ToyObjective(crash_at=25), max_steps=30)
    assert (tmp_path / "b/checkpoints/latest").read_text().strip() == "step-0000020"
    _, resumed, _ = _train(tmp_path / "b", max_steps=30)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    assert _log_steps(tmp_path / "b") == list(range(1, 31))  # steps 21-25 of the interrupted run are not repeated


def test_final_model_loads_and_records_the_run(tmp_path):
    trainer, final, _ = _train(tmp_path, max_steps=12, checkpoint_every=0, run_config={"method": "toy"})
    loaded, config = load_model_dir(tmp_path)  # "model" was added from model.config
    assert config["method"] == "toy" and config["steps_done"] == 12 and config["train"]["max_steps"] == 12
    x, t = torch.randn(4, 2), torch.full((4,), 30.0)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), final(x, t))
    assert not final.training
    # checkpoint_every=0: one checkpoint, at the end
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-0000012"]
    record = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "logs", "lr", "time"} <= set(record) and "buf" in record["logs"]
    files = set(os.listdir(tmp_path / "checkpoints/step-0000012"))
    assert files == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
                     "objective.safetensors", "objective.json", "state.json"}


def test_without_ema_returns_the_raw_model(tmp_path):
    trainer, final, _ = _train(tmp_path, max_steps=5, ema_decay=0.0)
    assert final is trainer.raw_model and not final.training
    assert "ema.safetensors" not in os.listdir(tmp_path / "checkpoints/step-0000005")


def test_finished_checkpoint_rewrites_the_final_model_without_training(tmp_path):
    _train(tmp_path, max_steps=10)
    before = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").unlink()
    _, _, obj = _train(tmp_path, max_steps=10)
    assert obj.calls == 0 and (tmp_path / "model.safetensors").read_bytes() == before
    _, _, obj = _train(tmp_path, max_steps=5)  # fewer steps than done: nothing to train
    assert obj.calls == 0 and load_model_dir(tmp_path)[1]["steps_done"] == 10


def test_checkpoint_rotation_keeps_n(tmp_path):
    _train(tmp_path, max_steps=25, checkpoint_every=5, keep_checkpoints=3)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-0000015", "step-0000020",
                                                            "step-0000025"]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-0000025"


# ---------------------------------------------------------------------- refusals
def test_resume_from_another_configuration_is_refused(tmp_path):
    _train(tmp_path, max_steps=10)
    with pytest.raises(RayflowError, match=r"step-0000010: checkpoint is from another configuration: "
                                           r"train\.weight_decay was 0\.01, now 0\.02"):
        _train(tmp_path, max_steps=20, weight_decay=0.02)
    with pytest.raises(RayflowError, match=r"another configuration: data was \"a\", now \"b\""):
        _train(tmp_path / "x", run_config={"model": MODEL_CFG.to_dict(), "data": "a"}, max_steps=5)
        _train(tmp_path / "x", run_config={"model": MODEL_CFG.to_dict(), "data": "b"}, max_steps=10)
    # operational settings may change
    _train(tmp_path, max_steps=12, log_every=3, checkpoint_every=4, keep_checkpoints=1)


def test_nan_loss_raises_and_writes_nothing_new(tmp_path):
    with pytest.raises(RayflowError, match="step 15: the loss is nan"):
        _train(tmp_path, objective=ToyObjective(nan_at=15), max_steps=40)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-0000010"]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-0000010"
    assert not (tmp_path / "model.safetensors").exists()
    assert max(_log_steps(tmp_path)) == 15  # steps are counted from 1: step index 15 (the 16th) left no line


@pytest.mark.parametrize("fail,nth", [("replace", 2), ("replace", 5), ("rename", 1), ("rename", 2)])
def test_crash_while_checkpointing_keeps_previous_checkpoint(tmp_path, monkeypatch, fail, nth):
    _train(tmp_path, max_steps=10)
    before = _snapshot(tmp_path)
    real = getattr(os, fail)
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # os.replace: atomic file writes; os.rename: .tmp-step-X -> step-X
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fail, flaky)
    with pytest.raises(OSError, match="simulated crash"):
        _train(tmp_path, max_steps=30)
    monkeypatch.undo()
    after = _snapshot(tmp_path)
    for name, data in before.items():
        if name.startswith("checkpoints/step-0000010/") or name in ("model.safetensors", "config.json"):
            assert after.get(name) == data, name  # the earlier checkpoint and the final model are untouched
    latest = (tmp_path / "checkpoints/latest").read_text().strip()
    assert latest in ("step-0000010", "step-0000020")
    assert all(len(os.listdir(p)) == 7 for p in (tmp_path / "checkpoints").glob("step-*"))  # none half-written
    # the run completes from the surviving checkpoint, identical to an uninterrupted one
    _, resumed, _ = _train(tmp_path, max_steps=30)
    _, straight, _ = _train(tmp_path / "ref", max_steps=30)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


# ---------------------------------------------------------------------- the teacher loss
def _two_gaussians(n: int = 512):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
    return means[labels] + 0.3 * torch.randn(n, 2, generator=g), labels


def test_epsilon_objective_loss_decreases(tmp_path):
    x, y = _two_gaussians()
    cfg = ModelConfig(kind="mlp", sample_shape=(2,), hidden=64, depth=2, num_classes=2)
    torch.manual_seed(0)
    objective = EpsilonObjective(x, y, VPSchedule.linear(1000), batch_size=256, label_dropout=0.1, num_classes=2)
    train_cfg = TrainConfig(max_steps=200, lr=3e-3, warmup_steps=10, ema_decay=0.99, checkpoint_every=0,
                            log_every=1, progress=False)
    Trainer(build_model(cfg), objective, train_cfg, tmp_path, {"model": cfg.to_dict()}).train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.75 * first, (first, last)


class _Recorder(Denoiser):
    """Returns a fixed function of (x, t) as the given prediction type; records the conditions it sees."""

    def __init__(self, prediction_type: str, schedule: VPSchedule) -> None:
        super().__init__()
        self.prediction_type, self.schedule, self.num_classes = prediction_type, schedule, 3
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, cond=None):
        self.seen.append(cond)
        eps = self.w * torch.tanh(x) + 0.01 * t[:, None]
        a, s = self.schedule.a(t)[:, None].float(), self.schedule.s(t)[:, None].float()
        x0 = (x - s * eps) / a
        return {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0, "flow": eps - x0}[
            self.prediction_type]


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction", "flow"])
def test_epsilon_objective_converts_predictions(prediction_type):
    sched = VPSchedule.linear(1000)
    x, y = _two_gaussians(64)
    obj = EpsilonObjective(x, y, sched, batch_size=32, label_dropout=0.0, num_classes=3)
    ref = obj(_Recorder("epsilon", sched), 3, torch.Generator().manual_seed(5)).loss
    got = obj(_Recorder(prediction_type, sched), 3, torch.Generator().manual_seed(5)).loss
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_epsilon_objective_label_dropout():
    sched = VPSchedule.linear(100)
    x, y = _two_gaussians(64)
    for p, expect in [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)]:
        model = _Recorder("epsilon", sched)
        obj = EpsilonObjective(x, y, sched, batch_size=4000, label_dropout=p, num_classes=3)
        obj(model, 0, torch.Generator().manual_seed(1))
        null_rate = float((model.seen[0] == 3).float().mean())
        assert abs(null_rate - expect) < 0.05
    model = _Recorder("epsilon", sched)
    EpsilonObjective(x, None, sched, batch_size=8)(model, 0, torch.Generator().manual_seed(1))
    assert model.seen[0] is None
    with pytest.raises(RayflowError, match="num_classes is 0"):
        EpsilonObjective(x, y, sched, batch_size=8)


# ---------------------------------------------------------------------- divergence, resume notices (issue #12 item 3)
class BlowUpObjective(ToyObjective):
    """Finite, but the loss is multiplied by 1e6 from ``blow_at`` on (a learning rate far too high)."""

    def __init__(self, blow_at: int) -> None:
        super().__init__()
        self.blow_at = blow_at

    def __call__(self, model, step, generator):
        out = super().__call__(model, step, generator)
        if step >= self.blow_at:
            out = LossOutput(out.loss * 1e6, out.logs)
        return out


def test_a_finite_blow_up_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(RayflowError, match=r"steps 20-24: the mean loss .* over 100x the run's median .* "
                                           r"the newest checkpoint, step-0000020, is intact"):
        _train(tmp_path, objective=BlowUpObjective(blow_at=22), max_steps=40, log_every=5)
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-0000020"
    assert not (tmp_path / "model.safetensors").exists()
    assert max(_log_steps(tmp_path)) == 20  # nothing written for the bad interval


def test_non_finite_weights_are_caught_at_the_check(tmp_path):
    class PoisonWeights(ToyObjective):
        def after_step(self, model, step, generator):
            logs = super().after_step(model, step, generator)
            if step == 14:  # the last step of an interval, its loss finite: only the weights tell
                with torch.no_grad():
                    next(unwrap_denoiser(model).parameters()).fill_(float("nan"))
            return logs

    with pytest.raises(RayflowError, match=r"steps 10-14: the weights are no longer finite"):
        _train(tmp_path, objective=PoisonWeights(), max_steps=40, log_every=5)
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-0000010"


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(RayflowError, match=r"step 3: the loss is nan \(diverged\); no checkpoint was written yet"):
        _train(tmp_path, objective=ToyObjective(nan_at=3), max_steps=40, log_every=5)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("step-*"))


def test_resume_may_change_lr_warmup_and_clipping_with_a_notice(tmp_path, capsys):
    _train(tmp_path, max_steps=10)
    capsys.readouterr()
    trainer, _, _ = _train(tmp_path, max_steps=14, lr=1e-3, warmup_steps=0, grad_clip=0.0)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rayflow: note: resuming step-0000010 with lr 0.003 -> 0.001, warmup_steps 5 -> 0, "
                   "grad_clip 0.5 -> 0.0"]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["step"] > 10] == [pytest.approx(1e-3)] * 4
    assert "grad_norm" not in records[-1] and "grad_norm" in records[0]


def test_checkpoint_of_an_older_version_without_new_train_keys_resumes(tmp_path):
    _train(tmp_path, max_steps=10)
    state_path = tmp_path / "checkpoints/step-0000010/state.json"
    state = json.loads(state_path.read_text())
    for key in ("gradient_accumulation_steps", "lr_schedule", "divergence_factor", "channels_last"):
        del state["config"]["train"][key]
    del state["loss_history"]
    state_path.write_text(json.dumps(state))
    _, resumed, _ = _train(tmp_path, max_steps=20)
    _, straight, _ = _train(tmp_path / "ref", max_steps=20)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


# ---------------------------------------------------------------------- speed-related behaviour (issue #13)
def test_tensor_logs_are_read_only_at_log_steps(tmp_path):
    class TensorLogs(ToyObjective):
        def __call__(self, model, step, generator):
            out = super().__call__(model, step, generator)
            return LossOutput(out.loss, {"xmean": torch.tensor(float(step))})

    _train(tmp_path, objective=TensorLogs(), max_steps=12, log_every=4)
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert [r["logs"]["xmean"] for r in records] == [3.0, 7.0, 11.0]  # the logged step's value, as a float
    for r in records:
        assert {"loss", "loss_mean", "lr", "time", "samples_per_s", "grad_norm"} <= set(r)
        assert isinstance(r["loss"], float) and r["loss_mean"] > 0


def test_gradient_accumulation_of_identical_micro_batches_equals_one_step(tmp_path):
    class Fixed(ToyObjective):  # the same batch whatever the generator: n micro-batches = one batch
        def __call__(self, model, step, generator):
            self.calls += 1
            x = torch.linspace(-1, 1, 32).reshape(16, 2)
            t = torch.arange(16).float()
            return LossOutput((model(x, t) - torch.sin(3 * x)).square().mean())

        def after_step(self, model, step, generator):
            return {}

    _, one, obj1 = _train(tmp_path / "a", objective=Fixed(), max_steps=6)
    _, two, obj2 = _train(tmp_path / "b", objective=Fixed(), max_steps=6, gradient_accumulation_steps=2)
    assert (obj1.calls, obj2.calls) == (6, 12)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_resumes_bit_identically(tmp_path):
    _, straight, _ = _train(tmp_path / "a", max_steps=20, gradient_accumulation_steps=3)
    _train(tmp_path / "b", max_steps=10, gradient_accumulation_steps=3)
    _, resumed, _ = _train(tmp_path / "b", max_steps=20, gradient_accumulation_steps=3)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))
    with pytest.raises(RayflowError, match="gradient_accumulation_steps was 3, now 1"):
        _train(tmp_path / "b", max_steps=30)


def test_warmup_follows_diffusers_get_scheduler(tmp_path):
    from diffusers.optimization import get_scheduler

    _train(tmp_path, max_steps=8, warmup_steps=4, lr_schedule="cosine")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    ref = get_scheduler("cosine", opt, num_warmup_steps=4, num_training_steps=8)
    expected = []
    for _ in range(8):
        opt.step()
        ref.step()
        expected.append(ref.get_last_lr()[0])
    assert lrs == pytest.approx(expected)


def test_config_aliases_and_new_validation():
    assert TrainConfig.from_dict({"checkpoints_total_limit": 4}).keep_checkpoints == 4
    assert TrainConfig(keep_checkpoints=3).checkpoints_total_limit == 3
    with pytest.raises(RayflowError, match="gradient_accumulation_steps"):
        TrainConfig(gradient_accumulation_steps=0)
    with pytest.raises(RayflowError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    with pytest.raises(RayflowError, match="divergence_factor"):
        TrainConfig(divergence_factor=0.5)
    with pytest.raises(RayflowError, match="channels_last"):
        TrainConfig(channels_last="sometimes")


def test_tensorboard_gets_the_same_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    _train(tmp_path, max_steps=4, log_every=2)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_callbacks_see_start_steps_and_end(tmp_path):
    seen = []

    def callback(trainer, event, step):
        seen.append((event, step))

    Trainer.callbacks.append(callback)
    try:
        _train(tmp_path, max_steps=3, checkpoint_every=0)
    finally:
        Trainer.callbacks.remove(callback)
    assert seen == [("start", 0), ("step", 1), ("step", 2), ("step", 3), ("end", 3)]


def test_a_launch_whose_world_disagrees_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher started two processes, accelerate joined one
    with pytest.raises(RayflowError, match="the launcher started 2 processes but accelerate sees 1"):
        _train(tmp_path, max_steps=2)
    assert not (tmp_path / "checkpoints").exists()


def test_ema_update_matches_the_lerp_formula():
    from rayflow.training import EMA

    model = _model()
    ema = EMA(model, 0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.9, 1 / 10)
    for b, s, p in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(s, d * b + (1 - d) * p)


# ---------------------------------------------------------------------- the frozen teacher
def test_prepare_frozen_teacher_on_a_cpu_changes_nothing_but_eval_and_grad(capsys):
    from rayflow.models import prepare_frozen_teacher

    model = _model().train()
    torch.nn.init.normal_(model.out[-1].weight, std=0.5)
    x, t = torch.randn(4, 2), torch.full((4,), 10.0)
    with torch.no_grad():
        ref = model.eval()(x, t)
    model.train()
    out = prepare_frozen_teacher(model, "cpu", dtype=torch.bfloat16, compile=True)
    assert out is model and not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out(x, t), ref)
    assert capsys.readouterr().err.strip() == (
        "rayflow: note: the frozen teacher is not compiled on a CPU (torch.compile and CUDA graphs are GPU settings "
        "here)")


def test_frozen_teacher_casts_weights_once_and_keeps_float32_outside():
    from rayflow.models import FrozenTeacher

    model = _model().eval()
    torch.nn.init.normal_(model.out[-1].weight, std=0.5)  # the output layer starts at zero: give it weights
    x, t = torch.randn(8, 2), torch.full((8,), 10.0)
    with torch.no_grad():
        ref = model(x, t)
        frozen = FrozenTeacher(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
        out = frozen(x, t)
    assert ref.abs().mean() > 0.1
    assert out.dtype == torch.float32 and frozen.prediction_type == model.prediction_type
    assert next(frozen.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.02)  # bf16 rounding only


def test_the_progress_bar_is_named_after_the_method_and_stage(tmp_path):
    """Parallel runs (five methods distilled at once) tell their bars apart; a teacher run stays "train"."""
    base = {"model": MODEL_CFG.to_dict()}
    cases = [({}, "train"), ({"method": {"name": "reflow"}}, "reflow: train"),
             ({"method": {"name": "proreflow"}, "stage": 2}, "proreflow stage 2: train")]
    for extra, label in cases:
        trainer = Trainer(_model(), ToyObjective(), _config(), tmp_path / label.replace(" ", "_"), {**base, **extra})
        assert trainer.progress_label() == label


class GlobalDrawObjective(ToyObjective):
    """Also draws from the global generator (as dropout would), recording the draws."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[float] = []

    def __call__(self, model, step, generator):
        self.draws.append(float(torch.rand(())))
        return super().__call__(model, step, generator)


def test_each_step_seeds_the_global_generator(tmp_path):
    from rayflow.training.config import micro_seed

    obj = GlobalDrawObjective()
    _train(tmp_path / "a", objective=obj, max_steps=6, checkpoint_every=0)
    expected = [float(torch.rand((), generator=torch.Generator().manual_seed(micro_seed(7, k, 0, 0))))
                for k in range(6)]
    assert obj.draws == expected


def test_the_optimizer_steps_without_accelerates_wrapper(tmp_path, monkeypatch):
    """Without a loss scaler the wrapper only forwards the step (after looking for an optional package on disk
    twice per step in accelerate 1.15): the trainer steps the wrapped optimizer itself, with the same result."""
    from accelerate.optimizer import AcceleratedOptimizer

    calls = []
    original = AcceleratedOptimizer.step
    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    _, model, _ = _train(tmp_path / "a", max_steps=5, checkpoint_every=0)
    assert calls == []
    trainer = Trainer(_model(), ToyObjective(), _config(max_steps=5, checkpoint_every=0), tmp_path / "b",
                      {"model": MODEL_CFG.to_dict()})
    trainer._plain_optimizer_step = False  # as under XLA: through accelerate's wrapper
    through_wrapper = trainer.train()
    assert len(calls) == 5
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), through_wrapper.parameters()))


def test_interval_sums_from_the_step_trace():
    from rayflow.training.trainer import _interval_sums

    trace = torch.tensor([[1.0, 0.5], [2.0, float("inf")], [float("nan"), 0.1], [4.0, float("nan")]])
    sums = _interval_sums(trace, first=10, never=99.0)
    assert torch.isnan(sums[0]) and sums[1:].tolist() == [12.0, 11.0]
    finite = _interval_sums(torch.tensor([[1.0, 0.0], [2.5, 3.0]]), first=0, never=99.0)
    assert finite.tolist() == [3.5, 99.0, 99.0]
