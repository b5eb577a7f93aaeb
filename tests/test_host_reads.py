"""No host read of a tensor's value in a training step between the trainer's checks (issue #13).

On a GPU every ``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()`` of a device tensor waits for all queued work.
This machine has no GPU, so the test counts the calls themselves: each objective of each method, the trainer's
step and the logs must make none between two checks. Excluded: torch's own CPU optimizer (on CUDA the fused
AdamW keeps its step count on the device) and the Time Sampler's update (it runs on the host by design, a step
behind, on pinned copies: off the critical path on a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rayflow.distillation import distill
from rayflow.methods import get_method
from rayflow.models import ModelConfig
from rayflow.training import EpsilonObjective, TrainConfig, Trainer

MOG = "mog:dim=4,modes=3,conditional=true,n=512,seed=1"
#: value reads, and ``.cpu()``: a device-to-host copy waits for the device as well (on this CPU-only machine every
#: tensor is a host tensor, so the code under test calls ``.cpu()`` only where a GPU run would copy)
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")
SRC = str(Path(__file__).resolve().parents[1] / "src" / "rayflow")
#: the Time Samplers keep their state on the host by design; on a GPU their input is the step's timesteps (drawn
#: on the host) and pinned copies of its losses, read a step later (see the module doc)
OFF_PATH = ("timestep_dists.py", "stein_time_sampler.py")
#: reads that happen only for CPU tensors: the schedule range-checks CPU timesteps on the host and device
#: timesteps with an asynchronous device assert (``torch._assert_async``)
CPU_ONLY = (("schedules.py", "check_timesteps"),)


class ReadCounter:
    """Patches the reading methods of ``torch.Tensor``; records where rayflow code read a value during a step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[str] = []
        self.active = False
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(original))

    def _wrap(self, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if counter.active:
                where = counter._caller()
                if where is not None:
                    counter.reads.append(where)
            return original(tensor, *args, **kwargs)

        return read

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        first = None
        while frame is not None:
            name = frame.f_code.co_filename
            if "torch/optim" in name.replace("\\", "/"):
                return None
            if name.startswith(SRC):
                if name.endswith(OFF_PATH) or frame.f_code.co_name == "snapshot":
                    return None
                if any(name.endswith(f) and frame.f_code.co_name == fn for f, fn in CPU_ONLY):
                    return None
                if first is None:
                    first = f"{Path(name).name}:{frame.f_lineno} ({frame.f_code.co_name})"
            frame = frame.f_back
        return first


def _count_reads_per_step(monkeypatch, run, check_every: int) -> dict[tuple[int, int], list[str]]:
    """Run ``run()`` with the reads counted; returns the reads of each step that is not right after a check."""
    counter = ReadCounter(monkeypatch)
    per_step: dict[tuple[int, int], list[str]] = {}
    runs = [0]  # ProReflow trains one stage after another: a trainer each

    def callback(trainer, event, step):
        if event == "start":
            counter.reads.clear()
            counter.active = True
            runs[0] += 1
        elif event == "step":
            per_step[(runs[0], step)] = list(counter.reads)
            counter.reads.clear()
        else:
            counter.active = False

    monkeypatch.setattr(Trainer, "callbacks", [callback])
    run()
    # the reads between the callbacks of steps k-1 and k belong to step k and to the check that follows step k-1
    return {k: v for k, v in per_step.items() if (k[1] - 1) % check_every != 0}


def _train(max_steps: int = 9) -> TrainConfig:
    return TrainConfig(max_steps=max_steps, batch_size=16, lr=1e-3, ema_decay=0.9, checkpoint_every=0, log_every=4,
                       progress=False)


def test_the_teacher_step_reads_nothing_from_the_device(monkeypatch, tmp_path):
    from rayflow.models import build_model
    from rayflow.schedules import VPSchedule

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2))
    x, y = torch.randn(64, 4), torch.arange(64) % 3
    objective = EpsilonObjective(x, y, VPSchedule.linear(), batch_size=16, num_classes=3)

    def run():
        Trainer(model, objective, _train(), tmp_path / "t", {"kind": "teacher"}).train()

    reads = _count_reads_per_step(monkeypatch, run, check_every=4)
    assert len(reads) >= 5
    assert all(not v for v in reads.values()), reads


@pytest.mark.parametrize("name,options", [
    ("rayflow", {"pool_size": "64", "teacher_steps": "2"}),
    # slow: the same objectives as rows of the fast set (another Time Sampler; PeRFlow's window objective)
    pytest.param("rayflow", {"pool_size": "64", "teacher_steps": "2", "time_sampler": "loss-history"},
                 marks=pytest.mark.slow),
    ("perflow", {"pool_size": "64", "solver_steps": "2"}),
    pytest.param("proreflow", {"pool_size": "64"}, marks=pytest.mark.slow),
    ("reflow", {"pool_size": "64"}),
    ("rectified-diffusion", {"pool_size": "64"}),
])
def test_method_steps_read_nothing_from_the_device(monkeypatch, tmp_path, name, options, one_thread):
    method = get_method(name).from_options(options)
    student = ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2)

    def run():
        distill(method, "exact", MOG, tmp_path / "out", _train(), student_model=student, progress=False)

    reads = _count_reads_per_step(monkeypatch, run, check_every=4)
    assert len(reads) >= 5
    assert all(not v for v in reads.values()), reads


def test_the_counter_sees_a_host_read(monkeypatch, tmp_path):
    """The counter itself: an objective that logs float(loss) is caught at every step."""
    from rayflow.models import build_model
    from rayflow.schedules import VPSchedule

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2))
    inner = EpsilonObjective(torch.randn(64, 4), torch.arange(64) % 3, VPSchedule.linear(), batch_size=16,
                             num_classes=3)

    def objective(model, step, generator):
        out = inner(model, step, generator)
        out.logs["loss_again"] = float(out.loss.detach())  # a host read every step
        return out

    def run():
        Trainer(model, objective, _train(), tmp_path / "t", {"kind": "teacher"}).train()

    reads = _count_reads_per_step(monkeypatch, run, check_every=4)
    assert reads and all(len(v) == 1 for v in reads.values()), reads


# ---------------------------------------------------------------------- the compiled frozen teacher
def _tiny_net():
    from rayflow.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=16, depth=2)).eval()


def test_a_failing_teacher_compile_falls_back_to_the_eager_network_with_one_notice(capsys):
    from rayflow.models import FrozenTeacher

    net = _tiny_net()
    calls = []

    def broken(x, t, cond):
        calls.append(1)
        raise RuntimeError("inductor: no C++ compiler found\nlong traceback ...")

    frozen = FrozenTeacher(net, torch.float32, fn=broken, cuda_graphs=True)
    x, t, c = torch.randn(5, 4), torch.full((5,), 500.0), torch.arange(5) % 3
    assert frozen.compiled
    out = frozen(x, t, c)
    torch.testing.assert_close(out, net(x, t, c))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rayflow: note: the frozen teacher could not be compiled (RuntimeError: " \
        "inductor: no C++ compiler found); it runs eagerly" in err
    assert not frozen.compiled
    frozen(x, t, c)  # later calls go straight to the eager network: no second attempt, no second notice
    assert calls == [1] and capsys.readouterr().err == ""


def test_a_compiled_float32_teacher_hands_back_a_copy_of_a_cuda_graph_output():
    from rayflow.models import FrozenTeacher

    net = _tiny_net()
    buffer = {}

    def graphed(x, t, cond):  # a CUDA graph replays into the same output buffer every call
        out = buffer.setdefault("out", torch.empty(x.shape[0], 4))
        return out.copy_(net(x, t, cond))

    frozen = FrozenTeacher(net, torch.float32, fn=graphed, cuda_graphs=True)
    x, t, c = torch.randn(5, 4), torch.full((5,), 500.0), torch.arange(5) % 3
    first = frozen(x, t, c)
    frozen(torch.randn(5, 4), t, c)
    torch.testing.assert_close(first, net(x, t, c))  # not overwritten by the second call


def test_teacher_compile_settings(capsys):
    from rayflow.errors import RayflowError
    from rayflow.models import prepare_frozen_teacher

    net = _tiny_net()
    assert prepare_frozen_teacher(net, "cpu", compile="auto", cuda_graphs="auto") is net  # auto: CUDA only, quietly
    assert capsys.readouterr().err == ""
    assert prepare_frozen_teacher(net, "cpu", compile="yes") is net
    assert "not compiled on a CPU" in capsys.readouterr().err
    with pytest.raises(RayflowError, match="compile must be yes, no or auto"):
        prepare_frozen_teacher(net, "cpu", compile="sometimes")


# ---------------------------------------------------------------------- CUDA graphs of the student step
def test_cuda_graph_compile_modes_fall_back_with_a_notice(tmp_path, capsys):
    from rayflow.errors import RayflowError
    from rayflow.schedules import VPSchedule

    net = _tiny_net().train()
    objective = EpsilonObjective(torch.randn(32, 4), torch.arange(32) % 3, VPSchedule.linear(), batch_size=8,
                                 num_classes=3)
    # compile="yes" on a CPU: graphs need a GPU (torch.compile is lazy: nothing is compiled before a step)
    cfg = TrainConfig(max_steps=1, batch_size=8, compile="yes", compile_mode="reduce-overhead", progress=False)
    trainer = Trainer(net, objective, cfg, tmp_path / "a", {"kind": "teacher"})
    assert trainer.compiled and not trainer.cuda_graphs
    assert capsys.readouterr().err.count("replays CUDA graphs, which need a GPU") == 1
    cfg = TrainConfig(max_steps=1, batch_size=8, compile="no", compile_mode="reduce-overhead", progress=False)
    trainer = Trainer(_tiny_net().train(), objective, cfg, tmp_path / "b", {"kind": "teacher"})
    assert not trainer.compiled and not trainer.cuda_graphs and capsys.readouterr().err == ""
    with pytest.raises(RayflowError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast")


# ---------------------------------------------------------------------- the Time Sampler a step late
def test_a_time_sampler_a_step_late_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """The GPU schedule of RayFlow's Time Sampler (its update of step n made after step n + 1 was queued), run on
    a CPU: a run killed after a checkpoint resumes bit-identical to an uninterrupted one, because the pending
    update is saved with the checkpoint; and it differs from the immediate schedule (the lag is real)."""
    import json

    from rayflow.methods.rayflow.objective import RayFlowObjective

    real_init, real_call = RayFlowObjective.__init__, RayFlowObjective.__call__

    def lagged_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.lagged = True

    student = ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2)
    opts = {"time_sampler": "learned", "time_sampler_warmup": "2", "x0_source": "data", "pool_size": "128"}
    train = TrainConfig(max_steps=12, batch_size=32, lr=2e-3, ema_decay=0.9, checkpoint_every=5, log_every=0,
                        progress=False)

    def run(out):
        return distill(get_method("rayflow").from_options(opts), "exact", MOG, out, train, student_model=student,
                       cache_dir=tmp_path / "cache", progress=False)

    now = run(tmp_path / "now")
    monkeypatch.setattr(RayFlowObjective, "__init__", lagged_init)
    straight = run(tmp_path / "a")

    def dying(self, model, step, generator):
        if step == 7:
            raise KeyboardInterrupt
        return real_call(self, model, step, generator)

    monkeypatch.setattr(RayFlowObjective, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-0000005" / "objective.json").read_text())
    assert "queued" in json.dumps(state)  # the update still to come is in the checkpoint
    monkeypatch.setattr(RayFlowObjective, "__call__", real_call)
    resumed = run(tmp_path / "b")
    for (k, v), (_, w) in zip(straight.student.network.state_dict().items(),
                              resumed.student.network.state_dict().items()):
        assert torch.equal(v, w), k
    assert (json.loads((tmp_path / "a" / "time_sampler.json").read_text())
            == json.loads((tmp_path / "b" / "time_sampler.json").read_text()))
    assert any(not torch.equal(v, w) for v, w in zip(now.student.network.state_dict().values(),
                                                     straight.student.network.state_dict().values()))


def test_a_fixed_time_density_is_fed_no_losses(tmp_path, monkeypatch, one_thread):
    """RayFlow's default (uniform t) learns nothing from the losses: its step stashes none (on a GPU: no pinned
    copy, no event and no wait for it a step later), and its density is still logged."""
    import json

    from rayflow.methods.rayflow.objective import RayFlowObjective

    stashed: list[int] = []
    real_stash = RayFlowObjective._stash
    monkeypatch.setattr(RayFlowObjective, "_stash", lambda self, *a: stashed.append(1) or real_stash(self, *a))
    student = ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2)
    train = TrainConfig(max_steps=6, batch_size=16, lr=1e-3, ema_decay=0.9, checkpoint_every=0, log_every=0,
                        progress=False)
    for sampler, expect in (("uniform", 0), ("loss-history", 6)):
        stashed.clear()
        out = tmp_path / sampler
        distill(get_method("rayflow").from_options({"pool_size": "64", "teacher_steps": "2",
                                                    "time_sampler": sampler}),
                "exact", MOG, out, train, student_model=student, progress=False)
        assert len(stashed) == expect, sampler
        log = json.loads((out / "time_sampler.json").read_text())
        assert log["sampler"] == sampler and log["snapshots"][0]["step"] == 1


def test_the_time_sampler_runs_on_one_host_thread(tmp_path, monkeypatch):
    """The learned Time Sampler's draws and updates (tiny host work beside the GPU step) run with torch's thread
    pool set to one thread, and the training around them keeps the pool it had (a pool's workers spin between tiny
    ops: BENCHMARKS §6.7)."""
    from conftest import torch_threads
    from rayflow.stein_time_sampler import SteinSampler

    seen: dict[str, set[int]] = {"sample": set(), "update": set()}
    for name in seen:
        real = getattr(SteinSampler, name)

        def spy(self, *a, _real=real, _name=name, **k):
            seen[_name].add(torch.get_num_threads())
            return _real(self, *a, **k)

        monkeypatch.setattr(SteinSampler, name, spy)
    student = ModelConfig(kind="mlp", sample_shape=(4,), num_classes=3, hidden=32, depth=2)
    train = TrainConfig(max_steps=4, batch_size=16, lr=1e-3, ema_decay=0.9, checkpoint_every=0, log_every=0,
                        progress=False)
    with torch_threads(2):
        distill(get_method("rayflow").from_options({"pool_size": "64", "x0_source": "data",
                                                    "time_sampler": "learned", "time_sampler_warmup": "1"}),
                "exact", MOG, tmp_path / "run", train, student_model=student, progress=False)
        assert torch.get_num_threads() == 2
    assert seen == {"sample": {1}, "update": {1}}
