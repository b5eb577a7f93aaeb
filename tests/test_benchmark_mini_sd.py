"""benchmarks/mini_sd.py: its refusals, the teacher part's dry run (a real StableDiffusionPipeline folder, loaded
back by diffusers' own class) and resume (CPU, no GPU needed)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("mini_sd.py", "bench_mini_sd") as module:
        yield module


@pytest.fixture(autouse=True)
def _one_thread():
    # the SD tests' rule on shared CPUs: torch's default pool is far slower on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_refuses_unknown_parts_and_a_bad_num(bench, fm_dir, tmp_path, capsys):
    common = ["--data", str(fm_dir), "--out", str(tmp_path / "run"), "--tiny", "--allow-cpu"]
    assert bench.main([*common, "--part", "teacher,lunch"]) == 2
    assert "unknown part(s) ['lunch']" in capsys.readouterr().err
    assert bench.main([*common, "--num", "3"]) == 2
    assert "--num must be >= 10" in capsys.readouterr().err
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
    stamp = saved.stat().st_mtime_ns
    assert bench.main(args) == 0  # resumed: nothing trained again
    assert saved.stat().st_mtime_ns == stamp
