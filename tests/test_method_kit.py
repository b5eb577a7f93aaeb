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
        assert v["rayflow-no-time-sampler"] == ("rayflow", {"time_sampler": "uniform"})
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
