"""benchmarks/mini_sd.py: its refusals, the teacher part's dry run (a real StableDiffusionPipeline folder, loaded
back by diffusers' own class) and resume (CPU, no GPU needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("mini_sd.py", "bench_mini_sd") as module:
        yield module


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_refuses_a_wrong_data_path(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--allow-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mini_sd: error: --data") and "no such directory" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_refuses_to_start_without_a_gpu(bench, fm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--data", str(fm_dir), "--out", str(tmp_path / "run")]) == 2
    assert "no GPU found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refuses_unknown_parts_methods_teachers_and_a_bad_num(bench, fm_dir, tmp_path, capsys):
    common = ["--data", str(fm_dir), "--out", str(tmp_path / "run"), "--tiny", "--allow-cpu"]
    assert bench.main([*common, "--part", "teacher,lunch"]) == 2
    assert "unknown part(s) ['lunch']" in capsys.readouterr().err
    assert bench.main([*common, "--num", "3"]) == 2
    assert "--num must be >= 10" in capsys.readouterr().err
    assert bench.main([*common, "--methods", "rayflow,lcm"]) == 2
    assert "unknown method(s) ['lcm']" in capsys.readouterr().err
    assert bench.main([*common, "--teacher", str(tmp_path)]) == 2
    assert "not a mini-SD teacher folder (no mini_sd.json)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refuses_a_run_directory_of_another_configuration(bench, fm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "bench_config.json").write_text(json.dumps({"vae_steps": 1}))
    assert bench.main(["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu", "--part", "teacher"]) == 2
    err = capsys.readouterr().err
    assert "made with another configuration" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == ["bench_config.json"]  # nothing written, nothing lost


def test_captions_carry_the_class_in_words_the_tokenizer_knows(bench, tmp_path):
    prompts, labels = bench.prompts_for(40)
    assert labels.tolist() == [i % 10 for i in range(40)]
    for p, c in zip(prompts, labels):
        assert bench.CLASSES[int(c)] in p
    assert len(set(prompts)) == 40  # four rounds of ten classes, each with another template
    tok = bench.caption_tokenizer(tmp_path / "tok", bench.vocabulary(), 16)
    for word in bench.vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1  # every caption word is one token
    ids = tok(prompts[0], add_special_tokens=False).input_ids
    assert tok.decode(ids) == prompts[0] and len(ids) == len(prompts[0].split())
    assert max(len(tok(p).input_ids) for p in prompts) <= 16  # fits the text encoder's 16 positions


def test_teacher_dry_run_saves_a_diffusers_pipeline_and_resumes(bench, fm_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    args = ["--data", str(fm_dir), "--out", str(run), "--tiny", "--allow-cpu", "--part", "teacher"]
    assert bench.main(args) == 0
    meta = [json.loads(line) for line in (run / "data" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 40 and all((run / "data" / m["file_name"]).exists() for m in meta)
    assert all(bench.CLASSES[m["label"]] in m["text"] for m in meta)
    train = json.loads((run / "rows" / "teacher_train.json").read_text())
    assert train["vae"]["test_psnr_db"] > 0 and train["unet"]["final_loss"] > 0
    cfg_rows = json.loads((run / "rows" / "teacher_cfg.json").read_text())
    chosen = json.loads((run / "rows" / "cfg.json").read_text())["guidance"]
    assert chosen in [r["guidance"] for r in cfg_rows]
    assert all(0 <= r["prompt_accuracy"] <= 1 and r["fd"] > 0 for r in cfg_rows)
    pipe = StableDiffusionPipeline.from_pretrained(str(run / "teacher"), dtype=torch.float32)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.beta_start == 0.00085 and pipe.scheduler.config.beta_end == 0.012
    saved = next((run / "teacher" / "unet").glob("*.safetensors"))
    from safetensors import safe_open

    with safe_open(str(saved), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    image = pipe("a photo of a sneaker", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    # the user's plain line, no dtype: diffusers' fp32 UNet must meet fp32 prompt embeddings
    plain = StableDiffusionPipeline.from_pretrained(str(run / "teacher"))
    assert plain("a bag", num_inference_steps=1, output_type="np").images.shape == (1, 32, 32, 3)
    stamp = saved.stat().st_mtime_ns
    assert bench.main(args) == 0  # resumed: nothing trained again
    assert saved.stat().st_mtime_ns == stamp
    # a finished teacher folder carries its record (mini_sd.json) and is adopted by another run as it is
    run2 = tmp_path / "run2"
    assert bench.main([*args[:2], "--out", str(run2), *args[4:], "--teacher", str(run / "teacher")]) == 0
    assert json.loads((run2 / "rows" / "cfg.json").read_text())["guidance"] == chosen
    assert not (run2 / "teacher-work").exists()  # nothing trained
    assert (run2 / "teacher" / "unet" / saved.name).read_bytes() == saved.read_bytes()


def _row(method, nfe, fd, acc=0.9, div=0.3):
    return {"method": method, "nfe": nfe, "fd": fd, "kid": fd / 100, "prompt_accuracy": acc, "diversity": div,
            "images_per_s": 100.0, "images_per_s_batch1": 10.0}


def test_targets_are_decided_on_the_rows(bench):
    rows = [_row("teacher dpm++-25", 25, 2.0, acc=0.90, div=0.30), _row("teacher dpm++", 4, 5.0),
            _row("rayflow", 1, 4.0), _row("rayflow", 2, 2.9, acc=0.885, div=0.25),
            _row("reflow", 1, 6.0), _row("reflow", 2, 3.5)]
    t = bench.check_targets(rows, ["rayflow", "reflow"])
    best = t["best_student_at_2_nfe"]
    assert best["method"] == "rayflow" and best["fd_within_1.5x"] and best["prompt_accuracy_within_2_points"]
    assert best["diversity_ratio"] == pytest.approx(0.25 / 0.30) and best["diversity_at_least_80_percent"]
    assert best["met"]
    one = t["every_student_at_1_nfe_beats_teacher_dpm++_4"]
    assert one["per_method"] == {"rayflow": True, "reflow": False} and not one["met"]
    assert t["rayflow_standing"]["2"] == {"rank_by_fd": 1, "of": 2, "order": ["rayflow", "reflow"]}
    rows[3] = _row("rayflow", 2, 3.1, acc=0.87, div=0.2)  # FD 1.55x, 3 points, 67 % of the diversity
    best = bench.check_targets(rows, ["rayflow", "reflow"])["best_student_at_2_nfe"]
    assert not (best["fd_within_1.5x"] or best["prompt_accuracy_within_2_points"]
                or best["diversity_at_least_80_percent"] or best["met"])
    table = bench.markdown_table(rows, 0.30)
    assert "| rayflow | 2 | 3.100 | 0.0310 | 87.0 % | 0.2000 (0.67×) | 10 | 100 |" in table


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread(bench):
    from rayflow.metrics import load_feature_net

    net = load_feature_net(bench.REPO / "benchmarks" / "checkpoints" / "fashion-mnist-feature-net")
    g = np.random.default_rng(0)
    same = np.repeat(g.integers(0, 255, (2, 1, 32, 32, 3), dtype=np.uint8), 4, axis=1).reshape(8, 32, 32, 3)
    assert bench.diversity(net, same, 4) == pytest.approx(0.0, abs=1e-6)
    spread = g.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    assert bench.diversity(net, spread, 4) > 0.01


@pytest.mark.slow
def test_dry_run_of_every_part_through_diffusers(bench, fm_dir, tmp_path):
    """--part all on a CPU (minutes on a loaded 2-core machine: five rayflow distill subprocesses + exports)."""
    from diffusers import StableDiffusionPipeline

    run, results = tmp_path / "run", tmp_path / "results"
    args = ["--data", str(fm_dir), "--out", str(run), "--results", str(results), "--tiny", "--allow-cpu"]
    assert bench.main(args) == 0
    distill = json.loads((run / "rows" / "distill.json").read_text())
    assert {m: (d["returncode"], d["export_returncode"]) for m, d in distill.items()} == {
        m: (0, 0) for m in bench.METHODS}
    report = json.loads((results / "mini_sd.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert methods == {*bench.METHODS, "teacher ddim-4", "teacher dpm++-3", "teacher ddim", "teacher dpm++"}
    for r in report["rows"]:
        assert set(r) == set(bench.ROW_KEYS)
        assert r["fd"] > 0 and 0 <= r["prompt_accuracy"] <= 1 and r["diversity"] >= 0 and r["images_per_s"] > 0
    assert {r["nfe"] for r in report["rows"] if r["method"] == "rayflow"} == {1, 2}
    assert isinstance(report["targets"]["best_student_at_2_nfe"]["met"], bool)
    assert report["versions"]["diffusers"] and report["command"].startswith("python benchmarks/mini_sd.py")
    for name in ("mini_sd_fd.png", "mini_sd_prompt_accuracy.png", "mini_sd.md",
                 *[f"mini_sd_grid_{m}.png" for m in bench.METHODS]):
        assert (results / name).stat().st_size > 0, name
    # the exported folders are plain diffusers pipelines: a LoRA file beside the teacher's components (and
    # rayflow's scheduler class, which diffusers resolves once rayflow.schedulers is imported)
    import rayflow.schedulers  # noqa: F401

    pipe = StableDiffusionPipeline.from_pretrained(str(run / "exports" / "rayflow"))
    pipe.load_lora_weights(str(run / "exports" / "rayflow"))
    assert pipe("a photo of a bag", num_inference_steps=1, guidance_scale=1, output_type="np").images.shape == (
        1, 32, 32, 3)
    judged = sorted((run / "rows" / "judge").iterdir())
    stamps = [p.stat().st_mtime_ns for p in judged]
    assert bench.main(args) == 0  # everything resumed, nothing measured again
    assert [p.stat().st_mtime_ns for p in sorted((run / "rows" / "judge").iterdir())] == stamps


def test_set_overrides_numbers_and_refuses_anything_else(bench):
    cfg = bench.override(bench.MiniSDConfig(), ["distill_steps=1000", "distill_lr=2e-4", "pool_size=4096"])
    assert (cfg.distill_steps, cfg.distill_lr, cfg.pool_size) == (1000, 2e-4, 4096)
    assert cfg.unet_steps == bench.MiniSDConfig().unet_steps  # the teacher's configuration is untouched
    for bad in ("distill_steps=many", "no_such_field=1", "tiny=1", "distill_steps=0", "distill_steps"):
        with pytest.raises(bench.RayflowError):
            bench.override(bench.MiniSDConfig(), [bad])
