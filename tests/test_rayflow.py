"""RayFlow: the ray algebra, the change of variables, eps_mu and its cache, distillation, resume and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from rayflow.caches import ShardedCache
from rayflow.cli import main as cli_main
from rayflow.data import load_dataset
from rayflow.distillation import distill, load_generator
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.methods import CountingDenoiser, DistillContext, get_method
from rayflow.methods.rayflow import (
    RayFlow,
    RayFlowConfig,
    RayFlowObjective,
    RayStudent,
    eps_mu_timesteps,
    epsilon_teacher,
    ray_point,
    ray_sample,
    ray_target,
    ray_x0_eps,
    unified_noise_expectation,
    vp_matched,
)
from rayflow.metrics import sliced_wasserstein
from rayflow.models import Denoiser, ModelConfig, default_model_config
from rayflow.samplers import make_timesteps
from rayflow.samplers import sample as teacher_sample
from rayflow.schedules import VPSchedule, convert_prediction, expand_like
from rayflow.training import TrainConfig

MOG = "mog:dim=8,modes=6,std=0.2,seed=3,n=2000,conditional=0"
SCHEDULES = {"linear": VPSchedule.linear(), "scaled_linear": VPSchedule.scaled_linear()}


class OracleStudent(Denoiser):
    """A perfect ray student for known instances: it returns their eps_mu (or v) wherever it is asked."""

    def __init__(self, x0: torch.Tensor, eps_mu: torch.Tensor, parameterization: str) -> None:
        super().__init__()
        self.x0, self.eps_mu, self.parameterization = x0, eps_mu, parameterization
        self.prediction_type = f"ray-{parameterization}"

    def forward(self, x, t, cond=None):
        return ray_target(self.x0, self.eps_mu, self.parameterization)


def _instances(n=64, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7 + 0.3, torch.randn(n, d, generator=g,
                                                                                         dtype=torch.float64)


def _coef(schedule, t, x):
    t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
    return expand_like(schedule.a(t), x), expand_like(schedule.s(t), x)


# ---------------------------------------------------------------------- the ray algebra
@pytest.mark.parametrize("parameterization", ["epsilon", "velocity"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_one_step_inversion_is_exact_for_an_exact_student(parameterization, schedule):
    sched = SCHEDULES[schedule]
    x0, eps_mu = _instances()
    a_T, s_T = _coef(sched, sched.T - 1, x0)
    x_T = ray_point(x0, eps_mu, a_T, s_T)
    out = ray_sample(OracleStudent(x0, eps_mu, parameterization), x_T, sched, steps=1)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("parameterization", ["epsilon", "velocity"])
@pytest.mark.parametrize("grid", [[999, 499, -1], [999, 731.5, 400, 17, -1], [640, 300, 0, -1], "random"])
def test_multi_step_along_the_ray_is_exact_on_any_grid(parameterization, grid):
    sched = SCHEDULES["scaled_linear"]
    x0, eps_mu = _instances(seed=1)
    if grid == "random":
        inner = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 998
        grid = [999.0, *sorted(inner.tolist(), reverse=True), -1.0]
    a, s = _coef(sched, grid[0], x0)
    start = ray_point(x0, eps_mu, a, s)
    out = ray_sample(OracleStudent(x0, eps_mu, parameterization), start, sched,
                     timesteps=torch.tensor(grid, dtype=torch.float64))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    # stopping early lands exactly on the ray point of the last timestep
    mid = ray_sample(OracleStudent(x0, eps_mu, parameterization), start, sched,
                     timesteps=torch.tensor(grid[:-1], dtype=torch.float64))
    a_end, s_end = _coef(sched, grid[-2], x0)
    torch.testing.assert_close(mid, ray_point(x0, eps_mu, a_end, s_end), rtol=0, atol=1e-10)


def test_process_reduces_to_vp_for_zero_target_and_unit_sigma():
    sched = SCHEDULES["linear"]
    x0, z = _instances(seed=3)
    t = torch.randint(0, sched.T, (x0.shape[0],), generator=torch.Generator().manual_seed(0)).double()
    a, s = _coef(sched, t, x0)
    torch.testing.assert_close(ray_point(x0, torch.zeros_like(x0), a, s, sigma=1.0, z=z), sched.add_noise(x0, z, t))


def test_closed_form_is_the_composition_of_the_markov_kernels():
    """[RECOVERED] kernel N(alpha_t x + (1 - alpha_t) eps_mu, beta_t^2 sigma^2) composed over every step gives
    mean a_t x0 + (1 - a_t) eps_mu and variance sigma^2 s_t^2 (the barred coefficient, reconstruction §2.4)."""
    sched = SCHEDULES["scaled_linear"]
    a = sched.a(torch.arange(sched.T, dtype=torch.float64))
    alpha = a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])  # per-step signal coefficient
    x0, eps_mu = _instances(n=4, seed=4)
    sigma = 0.3
    mean, var = x0.clone(), torch.zeros(())
    for t in range(sched.T):
        mean = alpha[t] * mean + (1 - alpha[t]) * eps_mu
        var = alpha[t] ** 2 * var + (1 - alpha[t] ** 2) * sigma**2
        if t in (0, 137, 500, sched.T - 1):
            torch.testing.assert_close(mean, a[t] * x0 + (1 - a[t]) * eps_mu, rtol=0, atol=1e-12)
            torch.testing.assert_close(var, sigma**2 * (1 - a[t] ** 2), rtol=1e-10, atol=1e-14)


def test_velocity_step_is_euler_in_a():
    sched = SCHEDULES["linear"]
    x, v = _instances(seed=5)
    a, an = 0.3, 0.55
    x0, eps = ray_x0_eps(v, "velocity", x, torch.tensor(a, dtype=torch.float64))
    torch.testing.assert_close(an * x0 + (1 - an) * eps, x + (an - a) * v)
    assert sched.T == 1000


# ---------------------------------------------------------------------- the change of variables
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_vp_matched_point_has_unit_variance_and_the_ray_snr(schedule):
    sched = SCHEDULES[schedule]
    t = torch.arange(0, sched.T, 7, dtype=torch.float64)
    c, a2, s2, t2 = vp_matched(sched, t)
    a = sched.a(t)
    torch.testing.assert_close(a2**2 + s2**2, torch.ones_like(a2))
    torch.testing.assert_close(a2 / s2, a / (1 - a))
    inside = t2 > 0  # t' clamps at 0 only where the ray is cleaner than the schedule's first step
    torch.testing.assert_close(sched.alpha_bar(t2[inside]), a2[inside] ** 2, rtol=1e-9, atol=1e-12)
    assert bool(torch.all(t2 <= t + 1e-9))


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_exact_teacher_as_network_gives_the_exact_ray_posterior(schedule):
    """With the exact mixture teacher as the network, the wrapped student's eps is E[eps_mu | x] for the ray
    x = a x0 + (1 - a) eps_mu (eps_mu ~ N(0, I)), and both forms convert back to the same (x0, eps)."""
    sched = SCHEDULES[schedule]
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched)
    x0, _ = mix.sample(128, torch.Generator().manual_seed(0))
    e = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randint(100, sched.T, (128,), generator=torch.Generator().manual_seed(2)).double()
    a = sched.a(t)
    x = (a[:, None] * x0.double() + (1 - a[:, None]) * e.double())
    exact = mix.posterior_eps(x, a, 1 - a)
    outs = {}
    for form in ("epsilon", "velocity"):
        pred = RayStudent(teacher, sched, form)(x, t)
        outs[form] = ray_x0_eps(pred, form, x, a[:, None])
    torch.testing.assert_close(outs["epsilon"][1], exact, rtol=0, atol=1e-5)  # t' goes through float32
    for i in range(2):
        torch.testing.assert_close(outs["velocity"][i], outs["epsilon"][i], rtol=0, atol=1e-9)


@pytest.mark.parametrize("network_type", ["sample", "v_prediction", "flow"])
def test_networks_of_any_prediction_type_convert_exactly(network_type):
    sched = SCHEDULES["linear"]
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched)

    class Converted(Denoiser):
        prediction_type = network_type

        def forward(self, x, t, cond=None):
            a, s = _coef(sched, t.double(), x)
            return convert_prediction(teacher(x, t), "epsilon", network_type, x, a.to(x.dtype), s.to(x.dtype))

    x, _ = _instances(n=32, seed=6)
    t = torch.full((32,), 700.0, dtype=torch.float64)
    for form in ("epsilon", "velocity"):
        torch.testing.assert_close(RayStudent(Converted(), sched, form)(x, t), RayStudent(teacher, sched, form)(x, t),
                                   rtol=1e-5, atol=1e-6)  # t' reaches the network as float32


def test_vp_samplers_refuse_a_ray_student():
    sched = SCHEDULES["linear"]
    student = RayStudent(ExactTeacher(GaussianMixture.from_options(dim=2, modes=2, seed=0), sched), sched, "velocity")
    with pytest.raises(RayflowError, match="unknown prediction type"):
        teacher_sample(student, torch.randn(4, 2), sched, "ddim", 2)


# ---------------------------------------------------------------------- the unified noise expectation
@pytest.mark.parametrize("timestep_set", ["linspace", "random", "999,400,37"])
def test_eps_mu_matches_a_direct_loop(timestep_set):
    sched = SCHEDULES["scaled_linear"]
    mix = GaussianMixture.from_options(dim=8, modes=6, std=0.2, seed=3)
    teacher = ExactTeacher(mix, sched, conditional=True)
    x0, labels = mix.sample(40, torch.Generator().manual_seed(0))
    eps = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    cfg = RayFlowConfig.from_dict(k_timesteps=5, timestep_set=timestep_set, timestep_min=10)
    ts = eps_mu_timesteps(cfg.targets, sched.T, 40, torch.Generator().manual_seed(2))
    got = unified_noise_expectation(teacher, x0, eps, ts, sched, labels, guidance=3.0)
    want = torch.zeros_like(x0)
    for i in range(40):
        for t in ts[i]:
            x_t = sched.a(t).float() * x0[i:i + 1] + sched.s(t).float() * eps[i:i + 1]
            c = teacher(x_t, t.float().reshape(1), labels[i:i + 1])
            u = teacher(x_t, t.float().reshape(1), torch.tensor([mix.num_modes]))
            want[i] += (u + 3.0 * (c - u))[0] / ts.shape[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if timestep_set == "linspace":
        assert ts[0].tolist() == [999.0, 752.0, 504.0, 257.0, 10.0]


def test_non_epsilon_teacher_is_converted_and_unknown_refused():
    sched = SCHEDULES["linear"]
    teacher = ExactTeacher(GaussianMixture.from_options(dim=4, modes=3, seed=1), sched)

    class VTeacher(Denoiser):
        prediction_type = "v_prediction"

        def forward(self, x, t, cond=None):
            a, s = _coef(sched, t.double(), x)
            return convert_prediction(teacher(x, t), "epsilon", "v_prediction", x, a.float(), s.float())

    x = torch.randn(16, 4)
    t = torch.full((16,), 500.0)
    torch.testing.assert_close(epsilon_teacher(VTeacher(), sched)(x, t), teacher(x, t), rtol=1e-4, atol=1e-5)

    class Weird(Denoiser):
        prediction_type = "score"

    with pytest.raises(RayflowError, match="predicts 'score'"):
        epsilon_teacher(Weird(), sched)


# ---------------------------------------------------------------------- the eps_mu cache
def _context(tmp_path, dataset, teacher_model, schedule, cache=True, **train):
    return DistillContext(
        teacher=CountingDenoiser(teacher_model), schedule=schedule, dataset=dataset,
        train=TrainConfig(**{"max_steps": 10, "batch_size": 32, "progress": False, "log_every": 0,
                             "checkpoint_every": 0, **train}),
        out_dir=tmp_path / "out", student_config=default_model_config(dataset.sample_shape, dataset.num_classes),
        student_init=None, cache_dir=(tmp_path / "cache") if cache else None, progress=False,
    )


class DyingTeacher(Denoiser):
    """The exact teacher, killed (KeyboardInterrupt) on its ``die_at``-th call, as a process would be."""

    def __init__(self, model, die_at):
        super().__init__()
        self.model, self.die_at, self.calls = model, die_at, 0
        self.prediction_type, self.num_classes = model.prediction_type, model.num_classes

    def forward(self, x, t, cond=None):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return self.model(x, t, cond)

    def fingerprint(self):
        return self.model.fingerprint()


def test_cache_resumes_after_a_kill_and_refuses_a_mismatch(tmp_path):
    ds = load_dataset(MOG)
    sched = SCHEDULES["linear"]
    exact = ExactTeacher(ds.mixture, sched)
    method = RayFlow(RayFlowConfig.from_dict(k_timesteps=4, pool_size=100, cache_shard_size=32, x0_source="data",
                                                   eps_mu_reading="average"))
    root = tmp_path / "cache" / "eps_mu" / "data"
    # one teacher call per shard for data x0: the 3rd call dies while shard 2 is computed
    dying = DyingTeacher(exact, die_at=3)
    with pytest.raises(KeyboardInterrupt):
        method.build_pool(_context(tmp_path, ds, dying, sched), dying, "data", root)
    assert (root / "shard-00001.safetensors").exists() and not (root / "shard-00002.safetensors").exists()
    resumed_teacher = DyingTeacher(exact, die_at=-1)
    resumed = method.build_pool(_context(tmp_path, ds, resumed_teacher, sched), resumed_teacher, "data", root)
    assert resumed_teacher.calls == 2  # only the two missing shards were computed
    straight = method.build_pool(_context(tmp_path, ds, exact, sched), exact, "data", None)
    assert set(resumed) == {"noise_seed", "index", "eps_mu"}
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    # the cache holds the noise seeds: each instance's eps regenerates exactly, and eps_mu is the teacher's mean
    from rayflow.methods.rayflow import _noise_from_seeds

    eps = _noise_from_seeds(resumed["noise_seed"][:5], (8,))
    ts = eps_mu_timesteps(method.config.targets, sched.T, 5)
    want = unified_noise_expectation(exact, ds.x[resumed["index"][:5]], eps, ts, sched)
    torch.testing.assert_close(resumed["eps_mu"][:5], want)
    # another K, another teacher or another data set: refused with the differing key named
    other = RayFlow(RayFlowConfig.from_dict(k_timesteps=8, pool_size=100, cache_shard_size=32, x0_source="data",
                                            eps_mu_reading="average"))
    with pytest.raises(RayflowError, match="k_timesteps=4.*k_timesteps=8"):
        other.build_pool(_context(tmp_path, ds, exact, sched), exact, "data", root)
    stranger = ExactTeacher(GaussianMixture.from_options(dim=8, modes=6, std=0.3, seed=3), sched)
    with pytest.raises(RayflowError, match="teacher="):
        method.build_pool(_context(tmp_path, ds, stranger, sched), stranger, "data", root)
    assert ShardedCache(root, method.cache_meta(_context(tmp_path, ds, exact, sched), exact, "data"), 100,
                        shard_size=32).is_complete()


def test_teacher_pool_holds_teacher_samples(tmp_path):
    ds = load_dataset(MOG)
    sched = SCHEDULES["scaled_linear"]
    exact = ExactTeacher(ds.mixture, sched)
    method = RayFlow(RayFlowConfig.from_dict(k_timesteps=2, pool_size=40, cache_shard_size=16, x0_source="teacher",
                                   teacher_steps=10))
    pool = method.build_pool(_context(tmp_path, ds, exact, sched), exact, "teacher", tmp_path / "tp")
    from rayflow.methods.rayflow import _noise_from_seeds, teacher_x0

    eps = _noise_from_seeds(pool["noise_seed"], (8,))
    torch.testing.assert_close(pool["x0"], teacher_x0(exact, eps, sched, steps=10), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- distillation end to end
def _small_method(**options):
    # the K-point average reading: these tests count its K teacher calls per instance
    opts = {"k_timesteps": "4", "pool_size": "2048", "teacher_steps": "15", "eps_mu_reading": "average", **options}
    return RayFlow.from_options(opts)


def _train(**kw):
    base = {"max_steps": 150, "batch_size": 128, "lr": 2e-3, "progress": False, "log_every": 0,
            "checkpoint_every": 0, "ema_decay": 0.99}
    return TrainConfig(**{**base, **kw})


def test_distilled_student_beats_ddim_at_one_step(tmp_path):
    ds = load_dataset(MOG)
    method = _small_method(time_sampler="learned")  # the paper's T_theta, so its density log is checked below
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=64, depth=2)
    result = distill(method, "exact", ds, tmp_path / "s", _train(), cache_dir=tmp_path / "cache",
                     student_model=small, progress=False)
    sched = SCHEDULES["linear"]
    noise = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    truth, _ = ds.sample_truth(2000, torch.Generator().manual_seed(1))
    ray1 = sliced_wasserstein(method.sample(result.student, noise, sched, 1), truth)
    ddim1 = sliced_wasserstein(teacher_sample(ExactTeacher(ds.mixture, sched), noise, sched, "ddim", 1), truth)
    assert ray1 < 0.6 * ddim1, (ray1, ddim1)
    # teacher cost: the pool's teacher ODE (DPM-Solver++ 15 steps) and K = 4 eps_mu evaluations per instance
    assert result.teacher_nfe == 2048 * (15 + 4)
    # the directory is self-describing: a generator loads it and reproduces the student's samples
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["method"]["name"] == "rayflow" and cfg["sampler"]["name"] == "rayflow-ray"
    assert cfg["model"]["prediction_type"] == "flow"  # a from-scratch velocity student outputs -v directly
    gen = load_generator(model=str(tmp_path / "s"))
    torch.testing.assert_close(gen.generate(noise[:64], 2), method.sample(result.student, noise[:64], sched, 2))
    # `rayflow sample` and `rayflow eval` work on the output directory
    npz = tmp_path / "ray2.npz"
    assert cli_main(["sample", "--model", str(tmp_path / "s"), "--steps", "2", "--num", "256", "--out", str(npz),
                     "--device", "cpu"]) == 0
    assert cli_main(["eval", "--samples", str(npz), "--data", MOG, "--reference-num", "500", "--nfe", "2",
                     "--out", str(tmp_path / "eval")]) == 0
    row = json.loads((tmp_path / "eval" / "results.json").read_text())[0]
    assert row["nfe"] == 2 and row["sw"] < ddim1
    log = json.loads((tmp_path / "s" / "time_sampler.json").read_text())
    assert log["sampler"] == "learned" and len(log["snapshots"]) >= 2 and "target" in log["snapshots"][-1]
    assert (tmp_path / "s" / "time_sampler.png").exists()


def test_online_mode_computes_targets_per_batch(tmp_path):
    ds = load_dataset(MOG)
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=16, depth=1)
    method = _small_method(online="true", x0_source="mixed", mix_start="1", mix_end="0")
    train = _train(max_steps=4, batch_size=16)
    result = distill(method, "exact", ds, tmp_path / "s", train, student_model=small, progress=False)
    # K = 4 eps_mu evaluations per row, plus 15 ODE steps for the rows that took teacher x0 (all at step 0)
    assert 4 * 16 * 4 + 16 * 15 <= result.teacher_nfe <= 4 * 16 * (4 + 15)
    with pytest.raises(RayflowError, match="online=true"):
        distill(method, "exact", ds, tmp_path / "t", train, cache_dir=tmp_path / "c", student_model=small,
                progress=False)


def test_interrupted_distillation_resumes_exactly(tmp_path, monkeypatch):
    """Killed after its step-10 checkpoint, the run resumes there and ends bit-identical to an uninterrupted one
    (the learned Time Sampler's state included)."""
    ds = load_dataset(MOG)
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=32, depth=1)
    opts = {"time_sampler": "learned", "time_sampler_warmup": "3", "x0_source": "data", "pool_size": "512"}
    train = _train(max_steps=16, checkpoint_every=5, batch_size=32)
    straight = distill(_small_method(**opts), "exact", ds, tmp_path / "a", train, cache_dir=tmp_path / "cache",
                       student_model=small, progress=False)

    real_call = RayFlowObjective.__call__

    def dying(self, model, step, generator):
        if step == 12:
            raise KeyboardInterrupt
        return real_call(self, model, step, generator)

    monkeypatch.setattr(RayFlowObjective, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        distill(_small_method(**opts), "exact", ds, tmp_path / "b", train, cache_dir=tmp_path / "cache",
                student_model=small, progress=False)
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step-0000010"
    monkeypatch.setattr(RayFlowObjective, "__call__", real_call)
    resumed = distill(_small_method(**opts), "exact", ds, tmp_path / "b", train, cache_dir=tmp_path / "cache",
                      student_model=small, progress=False)
    for (k, v), (_, w) in zip(straight.student.network.state_dict().items(),
                              resumed.student.network.state_dict().items()):
        assert torch.equal(v, w), k
    log_a = json.loads((tmp_path / "a" / "time_sampler.json").read_text())
    log_b = json.loads((tmp_path / "b" / "time_sampler.json").read_text())
    assert log_a == log_b


def test_teacher_initialised_student_starts_as_the_teacher(tmp_path):
    """With the teacher's output type kept, either form starts as that network at the VP-matched point; by
    default (``auto``) the flow form gets a flow head: the same weights, the output reinterpreted."""
    from rayflow.models import build_model

    ds = load_dataset(MOG)
    sched = SCHEDULES["linear"]
    cfg = ModelConfig(kind="mlp", sample_shape=(8,), hidden=32, depth=1)
    net = build_model(cfg)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)  # not the zero init: make the check meaningful
    ctx = _context(tmp_path, ds, net, sched, cache=False)
    ctx.student_config, ctx.student_init = cfg, net.state_dict()
    x, t = torch.randn(16, 8), torch.full((16,), 600.0)
    for form in ("epsilon", "flow"):
        method = RayFlow(RayFlowConfig.from_dict(parameterization=form, network_prediction="epsilon"))
        student = method.wrap_student(method.build_network(ctx), sched)
        torch.testing.assert_close(student(x, t), RayStudent(net, sched, form)(x, t))
    assert RayFlow(RayFlowConfig.from_dict(parameterization="epsilon")).build_network(ctx).prediction_type == "epsilon"

    method = RayFlow(RayFlowConfig.from_dict(parameterization="velocity"))  # the old name of the flow form
    assert method.config.ray.parameterization == "flow"
    head = method.build_network(ctx)
    assert head.prediction_type == "flow"
    for (k, v), (_, w) in zip(head.state_dict().items(), net.state_dict().items()):
        assert torch.equal(v, w), k
    # the raw output now reads as flow = eps_mu - x0 at the VP-matched point (c x, t'), the flow form's own output
    c, _, _, t2 = vp_matched(sched, t.double())
    torch.testing.assert_close(method.wrap_student(head, sched)(x, t), net(c[:, None].float() * x, t2.float()))


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option,message", [
    ("sigma=-0.1", "sigma must be >= 0"),
    ("k_timesteps=0", "k_timesteps \\(K\\) must be >= 1"),
    ("parameterization=x0", "parameterization must be one of"),
    ("time_sampler=beta", "time_sampler must be one of"),
    ("timestep_set=999,abc", "timestep_set must be"),
    ("x0_source=web", "x0_source must be one of"),
    ("bogus=1", "unknown option 'bogus'"),
])
def test_bad_options_are_one_line_errors_and_exit_code_2(tmp_path, capsys, option, message):
    with pytest.raises(RayflowError, match=message):
        get_method("rayflow").from_options(dict([option.split("=", 1)]))
    code = cli_main(["distill", "--method", "rayflow", "--teacher", "exact", "--data", MOG, "--out",
                     str(tmp_path / "o"), "--max-steps", "1", "--option", option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rayflow: error:")


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "karras"])
def test_every_spacing_samples_exactly(spacing):
    sched = SCHEDULES["scaled_linear"]
    x0, eps_mu = _instances(seed=7)
    method = RayFlow(RayFlowConfig.from_dict(spacing=spacing))
    grid = make_timesteps(3, sched.T, spacing, schedule=sched)
    a, s = _coef(sched, grid[0], x0)
    out = method.sample(OracleStudent(x0, eps_mu, "velocity"), ray_point(x0, eps_mu, a, s), sched, 3)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)


def test_bad_sampling_requests():
    sched = SCHEDULES["linear"]
    x0, eps_mu = _instances(n=4)
    student = OracleStudent(x0, eps_mu, "epsilon")
    with pytest.raises(RayflowError, match="steps must be >= 1"):
        RayFlow().sample(student, x0, sched, 0)
    with pytest.raises(RayflowError, match="decrease strictly"):
        ray_sample(student, x0, sched, timesteps=torch.tensor([500.0, 700.0, -1.0]))
    with pytest.raises(RayflowError, match="must lie in"):
        ray_sample(student, x0, sched, timesteps=torch.tensor([1200.0, -1.0]))


def test_mismatched_cache_through_the_command_line(tmp_path, capsys):
    args = ["distill", "--method", "rayflow", "--teacher", "exact", "--data", MOG, "--out", str(tmp_path / "o"),
            "--max-steps", "2", "--batch-size", "16", "--cache", str(tmp_path / "c"), "--no-progress",
            "--option", "pool_size=64", "--option", "x0_source=data"]
    assert cli_main([*args, "--option", "k_timesteps=2"]) == 0
    capsys.readouterr()
    code = cli_main([*args[:8], str(tmp_path / "o2"), *args[9:], "--option", "k_timesteps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "k_timesteps=2" in err[0] and "k_timesteps=3" in err[0]


@pytest.mark.parametrize("options, capturable", [
    ({}, True),  # uniform t drawn on the device, one pool: the trainer may capture the step
    ({"time_sampler": "learned"}, False),  # draws and learns on the host
    ({"online": "true"}, False),  # instances computed per batch, with host work
    ({"x0_source": "mixed"}, False),  # a teacher fraction that moves with the step
])
def test_which_rayflow_objectives_may_be_captured(tmp_path, options, capturable):
    from rayflow.training import Trainer

    seen = []

    def record(trainer, event, step):
        if event == "start":
            seen.append(trainer.objective.capturable)

    ds = load_dataset(MOG)
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=16, depth=1)
    Trainer.callbacks.append(record)
    try:
        distill(_small_method(pool_size="64", **options), "exact", ds, tmp_path / "s",
                _train(max_steps=1, batch_size=8), student_model=small, progress=False)
    finally:
        Trainer.callbacks.remove(record)
    assert seen == [capturable]


def test_uniform_time_draws_stay_on_the_generators_device():
    from rayflow.timestep_dists import UniformSampler

    sampler = UniformSampler(1000)
    g = torch.Generator().manual_seed(3)
    t, w = sampler.sample(64, g)
    assert sampler.draws_on_device and t.device.type == w.device.type == "cpu"
    assert torch.equal(t, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(w, torch.ones(64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_rayflow_step_trains_as_the_eager_one_on_a_gpu(tmp_path):
    """The default RayFlow objective captured (step 3 on) against eager steps: the same student."""
    from rayflow.training import Trainer

    ds = load_dataset(MOG)
    small = ModelConfig(kind="mlp", sample_shape=(8,), hidden=32, depth=2)
    students, captured = [], []

    def record(trainer, event, step):
        if event == "end":
            captured.append(trainer.stats.get("step_graph_captured_at"))

    Trainer.callbacks.append(record)
    try:
        for graph in ("no", "yes"):
            train = _train(max_steps=30, batch_size=64, compile="no", mixed_precision="no", step_graph=graph)
            students.append(distill(_small_method(pool_size="256"), "exact", ds, tmp_path / graph, train,
                                    cache_dir=tmp_path / "cache", student_model=small, progress=False).student)
    finally:
        Trainer.callbacks.remove(record)
    assert captured == [None, 3]
    for a, b in zip(students[0].parameters(), students[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
