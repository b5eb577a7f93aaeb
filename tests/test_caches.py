from __future__ import annotations

import pytest
import torch

from rayflow.caches import ShardedCache, build_or_load, model_fingerprint
from rayflow.errors import RayflowError
from rayflow.gmm import ExactTeacher, GaussianMixture
from rayflow.models import ModelConfig, build_model
from rayflow.schedules import VPSchedule

META = {"kind": "test", "teacher": "abc", "data": "mog:dim=2"}


def make_shard(index, start, count, g):
    return {"noise": torch.randn(count, 3, generator=g), "index": torch.arange(start, start + count)}


def test_resume_after_kill_gives_identical_items(tmp_path):
    calls = []

    def dying(index, start, count, g):
        if index == 2 and not calls:
            calls.append(index)
            raise KeyboardInterrupt  # the process is killed while computing shard 2
        return make_shard(index, start, count, g)

    with pytest.raises(KeyboardInterrupt):
        build_or_load(tmp_path / "c", META, 50, dying, seed=7, shard_size=8, progress=False)
    cache = ShardedCache(tmp_path / "c", META, 50, shard_size=8)
    assert cache.missing() == [2, 3, 4, 5, 6]
    # a torn file from the kill is treated as missing, not trusted
    cache.shard_path(2).write_bytes(b"\x00\x01garbage")
    resumed = build_or_load(tmp_path / "c", META, 50, dying, seed=7, shard_size=8, progress=False)
    straight = build_or_load(None, META, 50, make_shard, seed=7, shard_size=8)
    for k in straight:
        assert torch.equal(resumed[k], straight[k])
    assert resumed["index"].tolist() == list(range(50))  # nothing duplicated or lost


def test_complete_cache_is_reused_without_recomputing(tmp_path):
    build_or_load(tmp_path, META, 20, make_shard, shard_size=8, progress=False)

    def never(*args):
        raise AssertionError("a complete cache must not be recomputed")

    out = build_or_load(tmp_path, META, 20, never, shard_size=8, progress=False)
    assert out["noise"].shape == (20, 3)


def test_mismatched_cache_refused(tmp_path):
    build_or_load(tmp_path, META, 10, make_shard, shard_size=8, progress=False)
    with pytest.raises(RayflowError, match="teacher='abc'.*teacher='xyz'"):
        ShardedCache(tmp_path, {**META, "teacher": "xyz"}, 10, shard_size=8)
    with pytest.raises(RayflowError, match="num_items"):
        ShardedCache(tmp_path, META, 11, shard_size=8)


def test_ranks_write_their_own_shards(tmp_path):
    for rank in (1, 0):  # rank 1 first: it must not need rank 0's meta.json to exist... it writes none
        c = ShardedCache(tmp_path, META, 40, shard_size=8, rank=rank, world_size=2)
        c.build(make_shard, seed=1, progress=False)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [f"shard-{i:05d}.safetensors" for i in range(5)]
    both = ShardedCache(tmp_path, META, 40, shard_size=8).load()
    assert torch.equal(both["noise"], build_or_load(None, META, 40, make_shard, seed=1, shard_size=8)["noise"])


def test_incomplete_cache_load_names_missing_shard(tmp_path):
    c = ShardedCache(tmp_path, META, 40, shard_size=8, rank=0, world_size=2)
    c.build(make_shard, progress=False)
    with pytest.raises(RayflowError, match="shard-00001.safetensors: shard missing"):
        c.load()


def test_fingerprint_tracks_weights_and_mixture():
    net = build_model(ModelConfig(kind="mlp", sample_shape=(2,), hidden=8, depth=1))
    fp = model_fingerprint(net)
    with torch.no_grad():
        net.inp.weight[0, 0] += 1
    assert model_fingerprint(net) != fp
    sched = VPSchedule.linear()
    a = ExactTeacher(GaussianMixture.from_options(dim=2, modes=3), sched)
    b = ExactTeacher(GaussianMixture.from_options(dim=2, modes=4), sched)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_auto_shard_size_and_an_old_cut_kept(tmp_path):
    from rayflow.caches import auto_shard_size

    assert auto_shard_size(16384) == 1024 and auto_shard_size(100) == 256 and auto_shard_size(10**7) == 4096

    def make(i, s, c, g):
        return {"v": torch.arange(s, s + c).float()}

    build_or_load(tmp_path, {"k": 1}, 1000, make, shard_size=500, progress=False)  # an older 500-item cut
    stamp = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    out = build_or_load(tmp_path, {"k": 1}, 1000, make, progress=False)  # auto would choose 256
    assert torch.equal(out["v"], torch.arange(1000).float())
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # reused, not recomputed
    assert not (tmp_path / "shard-00003.safetensors").exists()


def test_fingerprint_of_channels_last_bf16_weights_is_layout_independent():
    """A channels-last 1x1 conv weight counts as contiguous but has stride(-1) != 1 (the bf16 frozen teacher
    on CUDA): the fingerprint must still read it, and equal the plain layout's."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3)).to(torch.bfloat16)
    fast = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3)).to(torch.bfloat16)
    fast.load_state_dict(plain.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    assert fast[0].weight.stride(-1) != 1 and fast[1].weight.stride(-1) != 1
    assert model_fingerprint(fast) == model_fingerprint(plain)
