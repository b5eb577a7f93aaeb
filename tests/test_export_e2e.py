"""End to end for every method: tiny pipeline -> captions -> distil 2 steps with a LoRA -> `rayflow export` ->
diffusers' own pipeline class (+ load_lora_weights) -> 1, 2 and 3 step latents equal to rayflow's sampler of the
student from the same noise.

Tolerance: 1e-4 absolute on the latents (the issue's bound). Both sides run the same float32 UNet on the same
inputs; what may differ is the order of the scheduler arithmetic (diffusers' pipeline loop and the exported
scheduler's step against rayflow's own sampler loop). Slow (about 20-45 s per method on a shared 2-core CPU).
"""

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
#: the smallest settings that train every method in two steps (pools of 8, one- or two-step teacher solves)
TINY_OPTIONS = {
    "reflow": {"pool_size": "8", "pair_steps": "2"},
    "perflow": {"pool_size": "8", "solver_steps": "1"},
    "rectified-diffusion": {"pool_size": "8", "pair_steps": "2"},
    "proreflow": {"pool_size": "8", "solver_steps": "1"},
    "rayflow": {"pool_size": "8", "teacher_steps": "2", "k_timesteps": "2"},
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return build_tiny_sd_pipeline(root / "pipe"), build_tiny_caption_folder(root / "caps", n=8)


def _distil_export_compare(tmp_path, capsys, tiny, method_name: str, fuse: bool) -> None:
    from diffusers import StableDiffusionPipeline

    pipe_dir, caps = tiny
    method = get_method(method_name).from_options(TINY_OPTIONS[method_name])
    sd.distill_sd(method, pipe_dir, f"captions:path={caps}", tmp_path / "student",
                  TrainConfig(max_steps=2, batch_size=4, progress=False, compile="no"),
                  sd.SDOptions(lora=sd.LoraSpec(rank=4), resolution=16), guidance=2.0, progress=False)
    out = tmp_path / "export"
    argv = ["export", "--model", str(tmp_path / "student"), "--out", str(out)] + (["--fuse"] if fuse else [])
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "rayflow_export.json").read_text())
    assert record["method"] == method_name and record["lora"] is (not fuse)

    student = sd.load_sd_student(tmp_path / "student")
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    if not fuse:
        pipe.load_lora_weights(str(out))
    noise = torch.randn(len(PROMPTS), *student.latent_shape, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3):
        want = student.sample_latents(PROMPTS, steps, noise=noise.clone())
        with torch.no_grad():
            got = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=1.0, latents=noise.clone(),
                       output_type="latent").images
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0,
                                   msg=lambda m, k=steps: f"{method_name} {k} steps: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(TINY_OPTIONS))
def test_every_method_distils_exports_and_samples_in_diffusers(tmp_path, capsys, tiny, method):
    _distil_export_compare(tmp_path, capsys, tiny, method, fuse=False)


@pytest.mark.slow
def test_fused_export_and_a_refused_out_dir(tmp_path, capsys, tiny):
    _distil_export_compare(tmp_path, capsys, tiny, "rectified-diffusion", fuse=True)
    # exporting again over a folder that holds something else is refused, the folder untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "student"), "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a rayflow export" in err[0]
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
