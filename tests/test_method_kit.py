"""The method kit: a new method is one file plus one registry line, and it appears everywhere methods are listed;
one option name for the training pool; nested configs with flat option names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rayflow.cli import main as cli_main
from rayflow.demo import demo_methods
from rayflow.methods import METHODS, available_methods, get_method
from rayflow.methods.base import config_fields, config_from_dict
from rayflow.methods.rayflow import RayFlow, RayFlowConfig

REPO = Path(__file__).resolve().parents[1]

TOY = '''
"""A toy method: the smallest file a new method needs."""
from dataclasses import dataclass

from rayflow.methods import register
from rayflow.methods.base import Method
from rayflow.schedulers import GridDDIMScheduler, schedule_fields


@dataclass
class ToyConfig:
    pool_size: int = 8


@register
class Toy(Method):
    """Toy: DDIM on the teacher's own weights (no training)."""

    name = "toy-method"
    display_name = "Toy"
    config_class = ToyConfig
    tiny_options = {"pool_size": "2"}

    def make_scheduler(self, schedule, network=None):
        return GridDDIMScheduler(**schedule_fields(schedule))
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method_module.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_method_module  # noqa: F401 - registering is the import's effect

    yield METHODS["toy-method"]
    METHODS.pop("toy-method", None)
    sys.modules.pop("toy_method_module", None)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_fm_kit", REPO / "benchmarks" / "fashion_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_new_method_appears_in_the_cli_demo_and_benchmark(toy, capsys):
    assert "toy-method" in available_methods() and get_method("toy-method") is toy
    assert cli_main(["methods"]) == 0
    assert any(line.startswith("toy-method") and "Toy: DDIM" in line for line in capsys.readouterr().out.splitlines())
    assert "toy-method" in demo_methods()
    bench = _bench()
    try:
        assert bench.variants()["toy-method"] == ("toy-method", {})
        assert bench.tiny_options()["toy-method"] == {"pool_size": "2"}
    finally:
        sys.modules.pop("bench_fm_kit", None)
    assert toy.from_options({"pool_size": "3"}).config.pool_size == 3


def test_builtin_presets_come_from_the_methods():
    bench = _bench()
    try:
        v = bench.variants()
        assert v["proreflow-ii"] == ("proreflow", {"preset": "II"})
        assert v["rayflow-learned-time-sampler"] == ("rayflow", {"time_sampler": "learned"})
        assert set(bench.ISSUE_VARIANTS) <= set(v)
    finally:
        sys.modules.pop("bench_fm_kit", None)
    for name in available_methods():
        cls = get_method(name)
        cls.from_options(dict(cls.demo_options))  # every preset is a valid configuration
        cls.from_options(dict(cls.tiny_options))
        assert cls.title() != name or name == "toy-method"


@pytest.mark.parametrize("name,old", [("reflow", "num_pairs"), ("perflow", "num_pairs"), ("proreflow", "num_pairs"),
                                      ("rectified-diffusion", "num_pairs"), ("rayflow", "cache_size")])
def test_pool_size_is_one_name_and_old_names_still_work(name, old, capsys):
    cls = get_method(name)
    new = cls.from_options({"pool_size": "123"})
    assert capsys.readouterr().err == ""
    legacy = cls.from_options({old: "123"})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayflow: warning:") and old in err[0]
    assert legacy.config == new.config
    pool = new.config.targets.pool_size if name == "rayflow" else new.config.pool_size
    assert pool == 123
    # an old config.json (flat, with the old name) reads silently
    assert config_from_dict(cls.config_class, {old: 7}) == config_from_dict(cls.config_class, {"pool_size": 7})


def test_pool_size_flag_refuses_nonsense(tmp_path, capsys):
    assert cli_main(["distill", "--method", "reflow", "--teacher", "exact", "--data", "mog:dim=2", "--out",
                     str(tmp_path / "s"), "--pool-size", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("rayflow: error: --pool-size must be >= 1")


def test_nested_config_reads_flat_nested_and_mixed():
    fields = config_fields(RayFlowConfig)
    assert fields["sigma"] == ("ray", "sigma") and fields["spacing"] == ("sampling", "spacing")
    flat = RayFlowConfig.from_dict(k_timesteps=3, sigma=0.5, start_std=1.5, time_sampler="uniform")
    assert flat.targets.k_timesteps == 3 and flat.ray.sigma == 0.5 and flat.sampling.start_std == 1.5
    assert RayFlowConfig.from_dict(flat.to_dict()) == flat
    assert RayFlowConfig.from_dict({"ray": {"sigma": 0.5}, "k_timesteps": 3}).ray.sigma == 0.5
    with pytest.raises(TypeError):
        RayFlowConfig.from_dict(nonsense=1)
    assert RayFlow.from_options({"k-timesteps": "3"}).config.targets.k_timesteps == 3


# ---------------------------------------------------------------------- pure configuration (resolve)
def _ctx(tmp_path, cache=False, epsilon_init=False):
    import torch

    from rayflow.data import load_dataset
    from rayflow.gmm import ExactTeacher
    from rayflow.methods.base import DistillContext
    from rayflow.models import ModelConfig, build_model
    from rayflow.models.counting import CountingDenoiser
    from rayflow.schedules import VPSchedule
    from rayflow.training import TrainConfig

    ds = load_dataset("mog:dim=2,modes=3,n=200,seed=0")
    sched = VPSchedule.linear(1000)
    cfg = ModelConfig(kind="mlp", sample_shape=(2,), num_classes=ds.num_classes, hidden=16, depth=1)
    init = build_model(cfg).state_dict() if epsilon_init else None
    return DistillContext(
        teacher=CountingDenoiser(ExactTeacher(ds.mixture, sched, conditional=ds.num_classes > 0)), schedule=sched,
        dataset=ds, train=TrainConfig(max_steps=2, batch_size=8, progress=False, log_every=0, checkpoint_every=0),
        out_dir=tmp_path / "out", student_config=cfg, student_init=init,
        cache_dir=(tmp_path / "cache") if cache else None, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("name", ["rayflow", "reflow", "perflow", "proreflow", "rectified-diffusion"])
def test_validation_never_changes_the_config_and_resolve_returns_a_new_one(name, tmp_path):
    import copy

    cls = get_method(name)
    config = cls.config_class()
    before = copy.deepcopy(config)
    method = cls(config)
    assert method.config is config and config == before  # validate() only checks
    for epsilon_init in (False, True):
        resolved = method.resolve(_ctx(tmp_path, epsilon_init=epsilon_init))
        assert config == before  # resolve() returns a new config ...
        assert cls(resolved).unresolved() == []  # ... in which nothing run-dependent is left
    if method.unresolved():  # a hand-built method with "auto" left refuses to sample, with a one-line error
        import torch

        from rayflow.errors import RayflowError
        from rayflow.schedules import VPSchedule

        with pytest.raises(RayflowError, match="still 'auto'"):
            method.sample(torch.nn.Identity(), torch.zeros(2, 2), VPSchedule.linear(1000), 1)


def test_auto_resolves_by_the_student_init(tmp_path):
    fresh, eps = _ctx(tmp_path), _ctx(tmp_path, epsilon_init=True)
    for name in ("perflow", "proreflow"):
        m = get_method(name)()
        assert m.resolve(fresh).parameterization == "flow"
        assert m.resolve(eps).parameterization == "window_epsilon"
    rd = get_method("rectified-diffusion")
    assert rd().resolve(fresh).student_schedule == "scaled_linear"
    assert rd.from_options({"phased": "1"}).resolve(fresh).student_schedule == "teacher"
    assert get_method("rayflow")().resolve(fresh).ray.network_prediction == "flow"


# ---------------------------------------------------------------------- one vocabulary, old names kept
@pytest.mark.parametrize("name,old,new", [
    ("reflow", "eps", "epsilon"), ("perflow", "diff_eps", "window_epsilon"), ("perflow", "ddim_eps", "epsilon"),
    ("perflow", "velocity", "flow"), ("perflow", "eps", "window_epsilon"), ("proreflow", "velocity", "flow"),
    ("rayflow", "velocity", "flow")])
def test_old_parameterisation_names_still_work(name, old, new, capsys):
    cls = get_method(name)
    legacy = cls.from_options({"parameterization": old})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayflow: warning:") and f"parameterization={new}" in err[0]
    assert legacy.config == cls.from_options({"parameterization": new}).config
    assert cls.config_from_dict({"parameterization": old}) == legacy.config  # an old config.json: silently
    assert capsys.readouterr().err == ""


def test_ray_flow_form_is_the_negated_velocity_bit_for_bit():
    import torch

    from rayflow.methods.rayflow import RayParameterization, ray_target, ray_x0_eps
    from rayflow.schedules import VPSchedule

    g = torch.Generator().manual_seed(0)
    x, x0, eps_mu, v = (torch.randn(64, 3, generator=g) for _ in range(4))
    a = torch.rand(64, 1, generator=g)
    old_x0, old_eps = ray_x0_eps(v, "velocity", x, a)
    new_x0, new_eps = ray_x0_eps(-v, "flow", x, a)
    assert torch.equal(old_x0, new_x0) and torch.equal(old_eps, new_eps)
    assert torch.equal(ray_target(x0, eps_mu, "flow"), -ray_target(x0, eps_mu, "velocity"))
    sched = VPSchedule.linear(1000)
    net = torch.nn.Linear(3, 3)
    net.prediction_type, net.num_classes = "flow", 0
    call = lambda form: RayParameterization(sched, form)(lambda z, t, c: net(z), x, torch.full((64,), 500.0),  # noqa
                                                            prediction_type="flow")
    assert torch.equal(call("flow"), -call("velocity"))


# ---------------------------------------------------------------------- PairSpec / make_pairs, the NFE account
def test_make_pairs_is_the_direct_call_and_charges_the_teacher_once(tmp_path):
    import torch

    from rayflow import pairs as P
    from rayflow.methods.kit import PairSpec, make_pairs
    from rayflow.models.counting import CountingDenoiser

    ctx = _ctx(tmp_path, cache=True)
    b = P.window_boundaries(2, 1000)
    spec = PairSpec("w", 16, seed=7, desc="test: window pairs", solver="ddim", steps=2, spacing=None, windows=b,
                    label_dropout=0.5)
    pool = make_pairs(ctx, spec)
    assert ctx.teacher_nfe == pool.nfe == 16 * 2
    other = CountingDenoiser(ctx.teacher.model)  # the same teacher, outside the run's account
    direct = P.window_pairs(P.teacher_window_solver(other, ctx.schedule, "ddim", 2), other, ctx.dataset,
                            ctx.schedule, b, 16, num_classes=ctx.teacher.num_classes, label_dropout=0.5,
                            seed=ctx.train.seed + 7)
    for key in direct.tensors:
        assert torch.equal(pool[key], direct[key]), key
    g = make_pairs(ctx, PairSpec("g", 8, seed=11, desc="test: global pairs", solver="ddim", steps=3))
    assert ctx.teacher_nfe == 16 * 2 + 8 * 3
    again = make_pairs(ctx, spec)  # read back from the cache: no evaluation now, the same recorded cost
    assert torch.equal(again["z_end"], pool["z_end"])
    assert ctx.teacher_nfe == 2 * 16 * 2 + 8 * 3 and len(g) == 8


def test_teacher_evaluations_outside_pools_count_live(tmp_path):
    import torch

    ctx = _ctx(tmp_path)
    with ctx.pool_cost(100):  # a pool recorded at 100, whatever its build evaluated now
        ctx.teacher(torch.zeros(4, 2), torch.full((4,), 10.0))
    assert ctx.teacher_nfe == 100
    ctx.teacher(torch.zeros(4, 2), torch.full((4,), 10.0))  # online targets: 4 rows evaluated now
    ctx.charge(5)  # an earlier stage reused from disk
    assert ctx.teacher_nfe == 100 + 4 + 5


def test_label_dropout_is_one_helper_with_the_old_draws():
    import torch

    from rayflow.models import drop_labels

    labels = torch.arange(100) % 7
    got = drop_labels(labels, 0.3, 7, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    drop = torch.rand(100, generator=g) < 0.3  # the three copies this replaced drew exactly this
    assert torch.equal(got, torch.where(drop, torch.full_like(labels, 7), labels))
    assert 0 < int((got == 7).sum()) < 100


def test_no_method_imports_another_and_pairs_imports_no_method():
    import ast

    src = REPO / "src" / "rayflow"
    methods = {"rayflow", "reflow", "perflow", "proreflow", "rectified_diffusion"}

    def imported(path):
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    for path in [*(src / "methods").glob("*.py"), *(src / "methods" / "rayflow").glob("*.py")]:
        own = "rayflow" if path.parent.name == "rayflow" else path.stem
        for mod in imported(path):
            parts = mod.split(".")
            if parts[:2] == ["rayflow", "methods"] and len(parts) > 2 and parts[2] in methods:
                assert parts[2] == own, f"{path.name} imports {mod}"
    assert not any(m.startswith("rayflow.methods") for m in imported(src / "pairs.py"))
    for folder in ("methods", "evaluation"):  # the kit's own floors stay small enough to read whole
        assert all(len(p.read_text().splitlines()) <= 450 for p in (src / folder).rglob("*.py"))
