"""End to end on issue-10 A's path: tiny pipeline -> captions -> distil 2 steps with a LoRA -> `rayflow export`
-> diffusers' own pipeline class -> 1, 2 (and 3) step latents equal to rayflow's sampler of the student."""

from __future__ import annotations

import json

import pytest
import torch

sd = pytest.importorskip("rayflow.pipelines.sd")

from rayflow.cli import main  # noqa: E402
from rayflow.methods import get_method  # noqa: E402
from rayflow.testing import build_tiny_caption_folder, build_tiny_sd_pipeline  # noqa: E402
from rayflow.training import TrainConfig  # noqa: E402

PROMPTS = ["a photo of a red cat", "a blue car"]


@pytest.mark.slow
@pytest.mark.parametrize("fuse", [False, True])
def test_distil_export_load_sample(tmp_path, capsys, fuse):
    from diffusers import StableDiffusionPipeline

    pipe_dir = build_tiny_sd_pipeline(tmp_path / "pipe")
    caps = build_tiny_caption_folder(tmp_path / "caps", n=8)
    method = get_method("rectified-diffusion").from_options({"num_pairs": "8"})
    sd.distill_sd(method, pipe_dir, f"captions:path={caps}", tmp_path / "student",
                  TrainConfig(max_steps=2, batch_size=4, progress=False, compile="no"),
                  sd.SDOptions(lora=sd.LoraSpec(rank=4)), progress=False)
    out = tmp_path / "export"
    argv = ["export", "--model", str(tmp_path / "student"), "--out", str(out)] + (["--fuse"] if fuse else [])
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "rayflow_export.json").read_text())
    assert record["method"] == "rectified-diffusion" and record["lora"] is (not fuse)

    student = sd.load_sd_student(tmp_path / "student")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    if not fuse:
        pipe.load_lora_weights(str(out))
    noise = torch.randn(len(PROMPTS), *student.latent_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3):
        want = student.sample_latents(PROMPTS, steps, noise=noise.clone())
        with torch.no_grad():
            got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                       output_type="latent").images
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # exporting again over a folder that holds something else is refused, the folder untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "student"), "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a rayflow export" in err[0]
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
