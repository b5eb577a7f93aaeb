"""Stable Diffusion pipeline teachers: caption data, latent preprocessing, text conditioning, LoRA students.

Everything runs on tiny random pipelines built offline by :mod:`rayflow.testing` (no download).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rayflow.captions import load_captions, transform_image
from rayflow.cli import main
from rayflow.errors import RayflowError
from rayflow.models.base import with_guidance
from rayflow.models.text import PromptTable, TextUNetDenoiser, add_lora
from rayflow.pipelines.sd import (
    check_pipeline_dir,
    encode_texts,
    load_sd_pipeline,
    load_sd_student,
    preprocess_captions,
)
from rayflow.testing import build_tiny_caption_folder, build_tiny_sd_pipeline

TINY = ["--max-steps", "2", "--batch-size", "2", "--lr", "1e-4", "--checkpoint-every", "1", "--no-progress",
        "--lora-rank", "4", "--resolution", "16", "--guidance", "2"]
METHOD_OPTIONS = {
    "reflow": ["--option", "pair_steps=2", "--pool-size", "4"],
    "perflow": ["--option", "solver_steps=1", "--pool-size", "4"],
    "rectified-diffusion": ["--option", "pair_steps=2", "--pool-size", "4"],
    "proreflow": ["--option", "solver_steps=1", "--pool-size", "4"],
    "rayflow": ["--option", "teacher_steps=2", "--option", "k_timesteps=2", "--pool-size", "4"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_for_module):
    yield


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", xl=True)


@pytest.fixture(scope="module")
def caps(tmp_path_factory):
    return build_tiny_caption_folder(tmp_path_factory.mktemp("caps") / "caps", n=16, size=24)


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------- teachers
def test_pipeline_schedule_and_prediction_type(sd_dir, tmp_path):
    from diffusers import DDPMScheduler

    sd = load_sd_pipeline(sd_dir)
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(sd.schedule.alpha_bar(torch.arange(1000)).float(), ref, atol=1e-7)
    assert sd.prediction_type == "epsilon" and not sd.xl and sd.default_resolution() == 16
    v = load_sd_pipeline(build_tiny_sd_pipeline(tmp_path / "v", prediction_type="v_prediction"))
    assert v.prediction_type == "v_prediction"


def test_bad_pipeline_folders(sd_dir, tmp_path):
    with pytest.raises(RayflowError, match="no model_index.json"):
        check_pipeline_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(RayflowError, match="not supported"):
        check_pipeline_dir(bad)
    shutil.rmtree(bad)
    shutil.copytree(sd_dir, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(RayflowError, match="component folder vae/ is missing"):
        check_pipeline_dir(bad)
    index = json.loads((sd_dir / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "vae"}))
    with pytest.raises(RayflowError, match="no 'vae' component"):
        check_pipeline_dir(bad)


def test_text_conditioning_and_cfg_match_the_unet(sd_dir):
    """cond = caption index; CFG's unconditional row is the empty prompt, as the diffusers pipeline builds it."""
    sd = load_sd_pipeline(sd_dir)
    dev = torch.device("cpu")
    enc = encode_texts(sd, ["a photo of a cat", ""], dev)
    ref_c, _ = sd.pipe.encode_prompt("a photo of a cat", dev, 1, False)
    assert torch.allclose(enc["embeds"][:1], ref_c)
    table = PromptTable(enc["embeds"])  # rows: [cat, null=""]
    model = TextUNetDenoiser(sd.unet, "epsilon", table)
    assert model.num_classes == 1
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        c = sd.unet(x, t, encoder_hidden_states=enc["embeds"][:1]).sample
        u = sd.unet(x, t, encoder_hidden_states=enc["embeds"][1:]).sample
        guided = with_guidance(model, 3.0)(x, t, torch.tensor([0]))
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)


def test_xl_conditioning_uses_zero_null_and_time_ids(xl_dir):
    from rayflow.pipelines.sd import prompt_table

    sd = load_sd_pipeline(xl_dir)
    assert sd.xl and sd.force_zeros_for_empty_prompt
    table = prompt_table(sd, ["a red car"], torch.device("cpu"), resolution=16)
    assert table.pooled is not None and float(table.embeds[-1].abs().sum()) == 0.0
    assert table.time_ids[0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    e, _, p, _ = sd.pipe.encode_prompt(prompt="a red car", device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        ref = sd.unet(x, t, encoder_hidden_states=e, added_cond_kwargs={"text_embeds": p,
                                                                         "time_ids": table.time_ids[:1]}).sample
        out = TextUNetDenoiser(sd.unet, "epsilon", table)(x, t, torch.tensor([0]))
    assert torch.allclose(out, ref, atol=1e-6)


def test_lora_starts_at_the_teacher_and_trains_only_the_adapter(sd_dir):
    import copy

    sd = load_sd_pipeline(sd_dir)
    table = PromptTable(encode_texts(sd, ["a dog", ""], torch.device("cpu"))["embeds"])
    student = copy.deepcopy(sd.unet)
    info = add_lora(student, 4, 8.0)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert info["rank"] == 4 and "to_q" in info["target_modules"] and "conv1" in info["target_modules"]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    with torch.no_grad():
        a = TextUNetDenoiser(sd.unet, "epsilon", table)(x, t, torch.tensor([0, 1]))
        b = TextUNetDenoiser(student, "epsilon", table)(x, t, torch.tensor([0, 1]))
    assert torch.equal(a, b)  # B = 0: the adapter adds exactly nothing at the start
    with pytest.raises(RayflowError, match="lora-rank"):
        add_lora(copy.deepcopy(sd.unet), 0)


# ---------------------------------------------------------------------- data
def test_caption_folder_and_its_errors(caps, tmp_path):
    data = load_captions(f"captions:path={caps}")
    assert len(data) == 16 and data.has_images and data.texts[0].startswith("a photo of")
    bad = tmp_path / "bad"
    build_tiny_caption_folder(bad, n=2, size=8)
    meta = bad / "metadata.jsonl"
    meta.write_text(meta.read_text() + "{not json\n")
    with pytest.raises(RayflowError, match=r"metadata.jsonl:3: not a JSON line"):
        load_captions(f"captions:path={bad}")
    meta.write_text(json.dumps({"file_name": "missing.png", "text": "x"}) + "\n")
    with pytest.raises(RayflowError, match="missing.png"):
        load_captions(f"captions:path={bad}")


def test_webdataset_shards_and_prompt_files(caps, tmp_path):
    shard = tmp_path / "data-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for ext, payload in (("png", (caps / f"{i:04d}.png").read_bytes()), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = load_captions(f"captions:path={tmp_path}")
    assert data.texts == ["caption 0", "caption 1", "caption 2"]
    assert data.records[1].load_image().size == (24, 24)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n" + json.dumps({"text": "a dog"}) + "\n")
    p = load_captions(f"prompts:path={prompts}")
    assert p.texts == ["a cat", "a dog"] and not p.has_images


def test_datasets_folder(caps, tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    ds = datasets.Dataset.from_dict({"image": [Image.open(caps / "0000.png")], "text": ["a tree"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    data = load_captions(f"captions:path={tmp_path / 'hf'}")
    assert data.texts == ["a tree"] and data.records[0].load_image().size == (24, 24)


def test_transform_image_matches_the_diffusers_recipe():
    from PIL import Image

    img = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 255)
    g = torch.Generator().manual_seed(0)
    x, orig, crop = transform_image(img, 10, True, False, g)
    assert x.shape == (3, 10, 10) and orig == (20, 40) and crop == (0, 5)
    ref = np.asarray(img.resize((20, 10), Image.BILINEAR).crop((5, 0, 15, 10)), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(x, torch.from_numpy(ref).permute(2, 0, 1))
    flipped, _, _ = transform_image(img, 10, True, True, g)
    assert torch.equal(flipped, x.flip(-1))


def test_preprocessing_cache_resumes_identically(sd_dir, caps, tmp_path):
    sd = load_sd_pipeline(sd_dir)
    data = load_captions(f"captions:path={caps}")
    kw = dict(center_crop=True, random_flip=True, shard_size=8, batch_size=8)
    full = preprocess_captions(sd, data, 16, cache_dir=tmp_path / "c", **kw)
    assert full["latents"].shape == (16, 4, 8, 8) and full["embeds"].shape == (16, 16, 32)
    (tmp_path / "c" / "latents" / "shard-00001.safetensors").unlink()  # an interrupted build
    again = preprocess_captions(sd, data, 16, cache_dir=tmp_path / "c", **kw)
    memory = preprocess_captions(sd, data, 16, cache_dir=None, **kw)
    for k in full:
        assert torch.equal(full[k], again[k]) and torch.equal(full[k], memory[k])

    # latents are scaling_factor * a VAE posterior draw of the transformed image
    x, _, _ = transform_image(data.records[0].load_image(), 16, True, False, torch.Generator())
    with torch.no_grad():
        dist = sd.vae.encode(torch.stack([x, x.flip(-1)])).latent_dist
    sf = sd.vae.config.scaling_factor
    err = [float(((full["latents"][0] / sf - m) / dist.std[0]).abs().max()) for m in dist.mean]
    assert min(err) < 6  # within the posterior's spread for one of the two flips

    # streamed: the shards joined once into one file per key, mapped rather than loaded; the same rows
    mapped = preprocess_captions(sd, data, 16, cache_dir=tmp_path / "c", mapped=True, **kw)
    flat = tmp_path / "c" / "latents" / "flat"
    index = json.loads((flat / "index.json").read_text())
    assert set(index["keys"]) == set(full) and index["keys"]["latents"]["shape"] == [16, 4, 8, 8]
    for k in full:
        assert torch.equal(mapped[k], full[k])
    stamp = (flat / "latents.bin").stat().st_mtime_ns
    assert torch.equal(preprocess_captions(sd, data, 16, cache_dir=tmp_path / "c", mapped=True, **kw)["embeds"],
                       full["embeds"])
    assert (flat / "latents.bin").stat().st_mtime_ns == stamp  # joined once, then reused
    with open(flat / "embeds.bin", "r+b") as f:  # a torn join is refused, not read
        f.truncate(100)
    with pytest.raises(RayflowError, match="truncated or missing"):
        preprocess_captions(sd, data, 16, cache_dir=tmp_path / "c", mapped=True, **kw)


def test_prompt_table_stacks_a_file_backed_cache_and_its_null_row(tmp_path):
    import copy

    from rayflow.models.text import StackedRows

    rows = torch.randn(5, 3, 4)
    rows.numpy().tofile(tmp_path / "e.bin")
    mapped = torch.from_file(str(tmp_path / "e.bin"), shared=False, size=rows.numel()).view(5, 3, 4)
    null = torch.zeros(1, 3, 4)
    table = PromptTable.with_null({"embeds": mapped}, {"embeds": null}, identity="cache-1")
    joined = PromptTable(torch.cat([rows, null]))
    assert table.num_prompts == 5 and isinstance(table.embeds, StackedRows)
    idx = torch.tensor([4, 5, 0, 5, 2])
    assert torch.equal(table.rows(idx, torch.device("cpu"), torch.float32)["encoder_hidden_states"],
                       joined.rows(idx, torch.device("cpu"), torch.float32)["encoder_hidden_states"])
    assert torch.equal(table.embeds[-1], null[0]) and torch.equal(table.embeds[1:3], rows[1:3])
    # the key names the cache and the null row, and a deep copy (an EMA shadow) shares the table
    assert table.key != PromptTable.with_null({"embeds": mapped}, {"embeds": null + 1}, identity="cache-1").key
    assert table.key != PromptTable.with_null({"embeds": mapped}, {"embeds": null}, identity="cache-2").key
    assert copy.deepcopy(table) is table


def test_prompt_table_rows_gathered_on_the_device_equal_the_host_rows(tmp_path, monkeypatch):
    """Off the CPU the table is copied to the device once and rows are gathered there (no host read of the indices
    per step, issue #13); forced here on a CPU: the same rows as the host path, for a file-backed table with its
    null row and an SDXL-style table, in float32 and bf16; a table over the limit stays on the host."""
    from rayflow.errors import RayflowError
    from rayflow.models import text

    rows = torch.randn(5, 3, 4)
    rows.numpy().tofile(tmp_path / "e.bin")
    mapped = torch.from_file(str(tmp_path / "e.bin"), shared=False, size=rows.numel()).view(5, 3, 4)
    stacked = PromptTable.with_null({"embeds": mapped}, {"embeds": torch.zeros(1, 3, 4)}, identity="cache-1")
    xl = PromptTable(torch.randn(6, 3, 4), torch.randn(6, 2), torch.randn(6, 6))
    idx = torch.tensor([4, 5, 0, 5, 2])
    cpu = torch.device("cpu")
    for table in (stacked, xl):
        for dtype in (torch.float32, torch.bfloat16):
            want, got = table.rows(idx, cpu, dtype, resident=False), table.rows(idx, cpu, dtype, resident=True)
            assert torch.equal(got["encoder_hidden_states"], want["encoder_hidden_states"])
            assert got["encoder_hidden_states"].dtype == dtype
            if table.pooled is not None:
                for key in ("text_embeds", "time_ids"):
                    assert torch.equal(got["added_cond_kwargs"][key], want["added_cond_kwargs"][key])
        assert table._resident[("cpu", torch.float32)] is not None  # copied once, then reused
        with pytest.raises(RayflowError, match="caption index out of range 0..5"):
            table.rows(torch.tensor([0, 6]), cpu, torch.float32, resident=True)
    monkeypatch.setattr(text, "RESIDENT_BYTES", 8)  # too large to keep: the host path, the same rows
    big = PromptTable(torch.randn(6, 3, 4))
    torch.testing.assert_close(big.rows(idx, cpu, torch.float32, resident=True)["encoder_hidden_states"],
                               big.embeds[idx])
    assert big._resident[("cpu", torch.float32)] is None


# ---------------------------------------------------------------------- the command line, end to end
def test_distill_lora_student_then_sample_prompts(sd_dir, caps, tmp_path, capsys):
    out = tmp_path / "student"
    code, stdout, err = _run(["distill", "--method", "reflow", "--teacher", str(sd_dir), "--data",
                              f"captions:path={caps}", "--out", str(out), "--cache", str(tmp_path / "cache"),
                              "--validation-prompts", "a red cat", "a blue car", "--validation-steps", "1",
                              *TINY, *METHOD_OPTIONS["reflow"]], capsys)
    assert code == 0, err
    # validation images: a grid per step (rows: 1, 2, 4 sampling steps; columns: prompts), the last one the
    # final student's samples of the seeded validation noise, and the same images in TensorBoard
    from PIL import Image

    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-0000001.png", "step-0000002.png"]
    last = np.asarray(Image.open(out / "validation" / "step-0000002.png"))
    assert last.shape == (3 * 16, 2 * 16, 3)
    final = load_sd_student(out)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for row, k in enumerate((1, 2, 4)):
        want = final.decode(final.sample_latents(["a red cat", "a blue car"], k, noise=noise))
        assert np.array_equal(last[16 * row:16 * (row + 1)], np.concatenate(list(want), axis=1)), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "run"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["validation/steps_1", "validation/steps_2", "validation/steps_4"]
    assert [e.step for e in events.Images("validation/steps_4")] == [1, 2]
    sd_info = json.loads((out / "sd.json").read_text())
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert sd_info["lora"]["rank"] == 4 and sd_info["pipeline"] == str(sd_dir.resolve())
    lora = load_file(str(out / "lora.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    # LoRA-only files: the final model, every checkpoint and its EMA hold the adapter and nothing else; the
    # config names the teacher's folder and the fingerprint of its UNet as the base
    for f in [out / "model.safetensors", *sorted((out / "checkpoints").glob("step-*/*.safetensors"))]:
        if f.name.startswith(("model", "ema")):
            keys = load_file(str(f)).keys()
            assert keys and all("lora_" in k for k in keys), f
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # --checkpoint-every 1, default limit 2
    base = json.loads((out / "config.json").read_text())["model"]["sd"]["base"]
    assert base["pipeline"] == str(sd_dir.resolve()) and len(base["fingerprint"]) == 16
    student = load_sd_student(out)
    peft_keys = {k for k in student.unet.state_dict() if "lora_" in k}
    assert len(peft_keys) == len(lora)
    assert student.prediction_type == "flow" and student.lora["rank"] == 4
    samples = tmp_path / "samples"
    code, stdout, err = _run(["sample", "--model", str(out), "--prompt", "a photo of a cat", "--prompt", "a red dog",
                              "--steps", "2", "--device", "cpu", "--out", str(samples)], capsys)
    assert code == 0, err
    assert (samples / "0000.png").is_file() and (samples / "0001.png").is_file() and (samples / "grid.png").is_file()
    npz = np.load(samples / "samples.npz")
    assert npz["images"].shape == (2, 16, 16, 3) and npz["x"].shape == (2, 4, 8, 8)
    again = student.sample_latents(["a photo of a cat", "a red dog"], 2, seed=0)
    assert torch.allclose(again, torch.from_numpy(npz["x"]), atol=1e-6)

    # resume: a run stopped after step 1 and started again ends with the same weights as the run above
    resumed = tmp_path / "resumed"
    common = ["distill", "--method", "reflow", "--teacher", str(sd_dir), "--data", f"captions:path={caps}",
              "--out", str(resumed), "--cache", str(tmp_path / "cache"), *TINY[2:], *METHOD_OPTIONS["reflow"]]
    assert _run([*common, "--max-steps", "1"], capsys)[0] == 0
    assert (resumed / "checkpoints" / "step-0000001").is_dir()
    assert _run([*common, "--max-steps", "2"], capsys)[0] == 0
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la, lb = load_file(str(out / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)

    # the base is read back from the teacher's folder: a changed or missing teacher is refused in one line
    moved = tmp_path / "teacher-copy"
    shutil.copytree(sd_dir, moved)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["sd"]["base"]["pipeline"] = str(moved)
    (out / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_sd_student(out).sample_latents(["a red dog"], 1, seed=3),
                       student.sample_latents(["a red dog"], 1, seed=3))
    from safetensors.torch import save_file
    unet_file = next((moved / "unet").glob("*.safetensors"))
    weights = load_file(str(unet_file))
    weights["conv_in.bias"] = weights["conv_in.bias"] + 1e-3
    save_file(weights, str(unet_file))
    with pytest.raises(RayflowError, match="teacher UNet has changed since the student was trained"):
        load_sd_student(out)
    shutil.rmtree(moved)
    with pytest.raises(RayflowError, match="base UNet .* is missing"):
        load_sd_student(out)


@pytest.mark.parametrize("case", [
    ("no-index", "no model_index.json"),
    ("bad-json", "not a JSON line"),
    ("rank-0", "--lora-rank must be >= 1"),
    ("prompts-perflow", "trains on real images"),
    ("gen-batch", "--gen-batch: only for a teacher directory"),
])
def test_distill_bad_input_is_one_line(sd_dir, caps, tmp_path, capsys, case):
    name, message = case
    teacher, data, extra, method = str(sd_dir), f"captions:path={caps}", [], "reflow"
    if name == "no-index":
        teacher = str(tmp_path)
    elif name == "bad-json":
        bad = build_tiny_caption_folder(tmp_path / "bad", n=2, size=8)
        (bad / "metadata.jsonl").write_text("{oops\n")
        data = f"captions:path={bad}"
    elif name == "rank-0":
        extra = ["--lora-rank", "0"]
    elif name == "gen-batch":
        extra = ["--gen-batch", "64"]
    else:
        (tmp_path / "p.txt").write_text("a cat\n")
        data, method = f"prompts:path={tmp_path / 'p.txt'}", "perflow"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(["distill", "--method", method, "--teacher", teacher, "--data", data, "--out", str(out),
                         "--max-steps", "1", *extra], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("rayflow: error:") and message in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_sample_refuses_prompts_for_other_models(tmp_path, capsys):
    code, _, err = _run(["sample", "--model", str(tmp_path), "--prompt", "a cat", "--out", str(tmp_path / "s")],
                        capsys)
    assert code == 2 and "neither a diffusers pipeline folder nor a student" in err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["perflow", "rectified-diffusion", "proreflow", "rayflow"])
def test_every_method_distils_a_lora_student(sd_dir, caps, tmp_path, capsys, method):
    out = tmp_path / "student"
    code, _, err = _run(["distill", "--method", method, "--teacher", str(sd_dir), "--data", f"captions:path={caps}",
                         "--out", str(out), "--cache", str(tmp_path / "cache"), *TINY, *METHOD_OPTIONS[method]],
                        capsys)
    assert code == 0, err
    assert (out / "lora.safetensors").is_file()
    student = load_sd_student(out)
    lat = student.sample_latents(["a green tree"], 2)
    assert lat.shape == (1, 4, 8, 8) and torch.isfinite(lat).all()


@pytest.mark.slow
def test_sdxl_lora_student_end_to_end(xl_dir, caps, tmp_path, capsys):
    out = tmp_path / "student"
    code, _, err = _run(["distill", "--method", "reflow", "--teacher", str(xl_dir), "--data", f"captions:path={caps}",
                         "--out", str(out), *TINY, *METHOD_OPTIONS["reflow"]], capsys)
    assert code == 0, err
    code, _, err = _run(["sample", "--model", str(out), "--prompt", "a blue house", "--steps", "1",
                         "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err and (tmp_path / "s" / "0000.png").is_file()


@pytest.mark.slow
def test_full_finetune_and_gradient_checkpointing(sd_dir, caps, tmp_path, capsys):
    out = tmp_path / "student"
    args = [a for a in TINY if a not in ("--lora-rank", "4")]
    code, _, err = _run(["distill", "--method", "reflow", "--teacher", str(sd_dir), "--data", f"captions:path={caps}",
                         "--out", str(out), "--full-finetune", "--gradient-checkpointing", *args,
                         *METHOD_OPTIONS["reflow"]], capsys)
    assert code == 0, err
    assert not (out / "lora.safetensors").exists() and json.loads((out / "sd.json").read_text())["lora"] is None


def test_sample_the_teacher_pipeline_with_prompts(sd_dir, tmp_path, capsys):
    """The teacher is sampled with rayflow's own solvers from the same seeded latents as students."""
    from rayflow.pipelines.sd import sample_teacher_latents
    from rayflow.samplers import sample as solve

    out = tmp_path / "t"
    code, _, err = _run(["sample", "--model", str(sd_dir), "--prompt", "a cat", "--steps", "2", "--sampler", "ddim",
                         "--guidance", "3", "--device", "cpu", "--out", str(out)], capsys)
    assert code == 0, err
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (1, 16, 16, 3) and (out / "grid.png").is_file()
    sd = load_sd_pipeline(sd_dir)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    enc = encode_texts(sd, ["a cat", ""], torch.device("cpu"))
    ref = solve(TextUNetDenoiser(sd.unet, "epsilon", PromptTable(enc["embeds"])), noise, sd.schedule, "ddim", 2,
                cond=torch.tensor([0]), guidance=3.0)
    assert torch.allclose(torch.from_numpy(npz["x"]), ref, atol=1e-5)
    assert torch.allclose(sample_teacher_latents(sd, ["a cat"], 2, "ddim", 3.0), ref, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rayflow", "perflow", "reflow"])
def test_v_prediction_teacher(tmp_path, caps, capsys, method):
    teacher = build_tiny_sd_pipeline(tmp_path / "v", prediction_type="v_prediction")
    out = tmp_path / "student"
    code, _, err = _run(["distill", "--method", method, "--teacher", str(teacher), "--data", f"captions:path={caps}",
                         "--out", str(out), *TINY, *METHOD_OPTIONS[method]], capsys)
    assert code == 0, err
    assert json.loads((out / "sd.json").read_text())["teacher_prediction_type"] == "v_prediction"
    assert torch.isfinite(load_sd_student(out).sample_latents(["a cat"], 1)).all()


@pytest.mark.slow
def test_prompts_only_data_for_reflow(sd_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na green tree\n")
    out = tmp_path / "student"
    code, _, err = _run(["distill", "--method", "reflow", "--teacher", str(sd_dir), "--data",
                         f"prompts:path={prompts}", "--out", str(out), *TINY, *METHOD_OPTIONS["reflow"]], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"].startswith("prompts:path=")


def _find_option(config, key):
    """An option's value in a method config, flat or inside a nested section (the method kit nests RayFlow's)."""
    import dataclasses

    def walk(d):
        for k, v in d.items():
            if k == key:
                return v
            if isinstance(v, dict):
                found = walk(v)
                if found is not None:
                    return found
        return None

    return walk(dataclasses.asdict(config))


def test_pool_size_is_each_methods_pool_option():
    from rayflow.cli import _pool_size_options
    from rayflow.methods import get_method

    for method in ("reflow", "perflow", "proreflow", "rectified-diffusion", "rayflow"):
        options = _pool_size_options(7, {})
        assert options == {"pool_size": "7"}
        assert _find_option(get_method(method).from_options(options).config, "pool_size") == 7
    with pytest.raises(RayflowError, match="pool-size must be >= 1"):
        _pool_size_options(0, {})
