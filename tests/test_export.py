"""Export of a LoRA / fused / fully fine-tuned student to a diffusers pipeline folder, loaded back by diffusers.

Every export is checked against a hand-written sampling loop with the same scheduler and student UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from rayflow.errors import RayflowError
from rayflow.pipelines.export import EXPORT_MARKER, LORA_WEIGHT_NAME, export_pipeline
from rayflow.testing import build_tiny_sd_pipeline

peft = pytest.importorskip("peft")

PROMPT = "a photo of a red cat"


class ToyFlowScheduler(SchedulerMixin, ConfigMixin):
    """A test-local non-diffusers scheduler: Euler steps of a flow (velocity) output on a VP schedule's
    trailing timesteps, ``x0 = (x - s_t v) ...``; here simply ``x_next = x + (tau_next - tau) * v`` with
    ``tau = t / T``, which is all the export needs (any rule the pipeline loop can call)."""

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        self.init_noise_sigma = 1.0
        self.timesteps = torch.tensor([num_train_timesteps - 1], dtype=torch.long)
        self.num_inference_steps = 1

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        T = self.config.num_train_timesteps
        steps = torch.arange(num_inference_steps, 0, -1, dtype=torch.float64) * T / num_inference_steps - 1
        self.timesteps = steps.round().long().to(device)
        self.num_inference_steps = num_inference_steps

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        T = self.config.num_train_timesteps
        t = int(timestep)
        idx = int((self.timesteps.cpu() == t).nonzero()[0])
        t_next = int(self.timesteps[idx + 1]) if idx + 1 < len(self.timesteps) else -1
        prev = sample + (t_next - t) / T * self.config.shift * model_output
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _ddim_trailing() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing", prediction_type="epsilon")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", xl=True)


#: LCM-LoRA's / RayFlow's SD targets (issue-10 A's default): attention, feed-forward, resnet convs, time projections
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _lora_student(pipe_dir: Path, rank: int = 4, alpha: int = 8, seed: int = 1,
                  targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")):
    """The teacher's UNet with a peft LoRA whose weights are random (B = 0 at init would make it a no-op)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(str(pipe_dir / "unet"))
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet.eval()


def _latents(pipe_dir: Path, seed: int = 3) -> torch.Tensor:
    cfg = json.loads((pipe_dir / "unet" / "config.json").read_text())
    return torch.randn(2, 4, cfg["sample_size"], cfg["sample_size"], generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hand_loop(unet, scheduler, latents, steps, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
    """The student's N-step sampler written out: ``x <- scheduler.step(unet(x, t, text), t, x)``."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=encoder_hidden_states,
                   added_cond_kwargs=added_cond_kwargs).sample
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def _sd_text(pipe_dir: Path, n: int) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"))
    enc = CLIPTextModel.from_pretrained(str(pipe_dir / "text_encoder"))
    ids = tok([PROMPT] * n, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return enc(ids)[0]


def _run_pipeline(pipe, latents, steps) -> torch.Tensor:
    with torch.no_grad():
        return pipe([PROMPT] * latents.shape[0], num_inference_steps=steps, guidance_scale=1.0,
                    latents=latents.clone(), output_type="latent").images


def test_lora_export_with_custom_scheduler_matches_hand_loop(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _lora_student(sd_dir)
    out = tmp_path / "export"
    res = export_pipeline(sd_dir, unet, ToyFlowScheduler(shift=0.5), out)
    assert res.lora and not res.fused
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == [ToyFlowScheduler.__module__, "ToyFlowScheduler"]
    assert (out / LORA_WEIGHT_NAME).is_file() and (out / EXPORT_MARKER).is_file()
    # the teacher's UNet is written unchanged: the LoRA lives only in the LoRA file
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.scheduler) is ToyFlowScheduler and pipe.scheduler.config.shift == 0.5
    pipe.load_lora_weights(str(out))
    lat = _latents(sd_dir)
    text = _sd_text(sd_dir, lat.shape[0])
    for steps in (1, 2):
        got = _run_pipeline(pipe, lat, steps)
        want = _hand_loop(unet, ToyFlowScheduler(shift=0.5), lat, steps, text)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the LoRA changes the output: the comparison above would not catch a LoRA silently dropped otherwise
    pipe.unload_lora_weights()
    assert (_run_pipeline(pipe, lat, 1) - want).abs().max() > 1e-2


def test_exported_lora_loads_into_teacher_with_every_key(sd_dir, tmp_path):
    """``load_lora_weights`` on the unchanged teacher pipeline restores every LoRA tensor, rank and alpha, with
    the full LCM-LoRA target set (convolutions and feed-forwards too: the case diffusers' own conversion loses)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = _lora_student(sd_dir, rank=4, alpha=8, targets=LCM_TARGETS)
    export_pipeline(sd_dir, unet, _ddim_trailing(), tmp_path / "export")
    teacher = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    teacher.load_lora_weights(str(tmp_path / "export"), adapter_name="student")
    cfg = teacher.unet.peft_config["student"]
    assert cfg.r == 4 and cfg.lora_alpha == 8
    want = get_peft_model_state_dict(unet)
    got = get_peft_model_state_dict(teacher.unet, adapter_name="student")
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:4]
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=0, rtol=0)


def test_fused_export_with_ddim_trailing_matches_lora_loop(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _lora_student(sd_dir)
    out = tmp_path / "fused"
    res = export_pipeline(sd_dir, unet, _ddim_trailing(), out, fuse=True)
    assert res.fused and not res.lora and not (out / LORA_WEIGHT_NAME).exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    assert not any("lora" in k for k in pipe.unet.state_dict())
    lat = _latents(sd_dir)
    text = _sd_text(sd_dir, lat.shape[0])
    for steps in (1, 2):
        torch.testing.assert_close(_run_pipeline(pipe, lat, steps),
                                   _hand_loop(unet, _ddim_trailing(), lat, steps, text), atol=1e-4, rtol=0)


def test_full_finetune_export_writes_the_student_unet(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    res = export_pipeline(sd_dir, unet, _ddim_trailing(), tmp_path / "full")
    assert not res.lora and not res.fused
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    torch.testing.assert_close(pipe.unet.conv_out.bias, unet.conv_out.bias)


def test_sdxl_lora_export_matches_hand_loop(sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = _lora_student(sdxl_dir, targets=LCM_TARGETS)
    out = tmp_path / "xl"
    res = export_pipeline(sdxl_dir, unet, ToyFlowScheduler(), out)
    assert res.pipeline_class == "StableDiffusionXLPipeline" and res.lora
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    pipe.load_lora_weights(str(out))
    lat = _latents(sdxl_dir)
    n, size = lat.shape[0], pipe.vae_scale_factor * lat.shape[-1]
    with torch.no_grad():
        # the text side is the pipeline's own; the loop under test is UNet + scheduler
        embeds, _, pooled, _ = pipe.encode_prompt([PROMPT] * n, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(n, 1)
    for steps in (1, 2):
        got = _run_pipeline(pipe, lat, steps)
        want = _hand_loop(unet, ToyFlowScheduler(), lat, steps, embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_reexport_replaces_a_previous_export(sd_dir, tmp_path):
    out = tmp_path / "export"
    export_pipeline(sd_dir, _lora_student(sd_dir), _ddim_trailing(), out)
    export_pipeline(sd_dir, _lora_student(sd_dir), _ddim_trailing(), out, fuse=True)
    assert not (out / LORA_WEIGHT_NAME).exists()
    assert json.loads((out / EXPORT_MARKER).read_text())["fused"] is True


# ---------------------------------------------------------------------- refusals
def test_refuses_a_pixel_space_teacher(tmp_path):
    pixel = tmp_path / "teacher"
    pixel.mkdir()
    (pixel / "config.json").write_text("{}")
    with pytest.raises(RayflowError, match="pixel-space"):
        export_pipeline(pixel, torch.nn.Linear(1, 1), _ddim_trailing(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_an_unsupported_pipeline_and_a_missing_component(sd_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sd_dir, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(RayflowError, match="not supported"):
        export_pipeline(bad, _lora_student(sd_dir), _ddim_trailing(), tmp_path / "out")
    (bad / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(bad / "vae")
    with pytest.raises(RayflowError, match="vae"):
        export_pipeline(bad, _lora_student(sd_dir), _ddim_trailing(), tmp_path / "out")


def test_refuses_an_out_dir_holding_other_files(sd_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RayflowError, match="not a rayflow export"):
        export_pipeline(sd_dir, _lora_student(sd_dir), _ddim_trailing(), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_refuses_a_lora_on_other_base_weights_unless_fused(sd_dir, tmp_path):
    unet = _lora_student(sd_dir)
    with torch.no_grad():
        unet.conv_in.weight.add_(0.1)
    with pytest.raises(RayflowError, match="--fuse"):
        export_pipeline(sd_dir, unet, _ddim_trailing(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export_pipeline(sd_dir, unet, _ddim_trailing(), tmp_path / "out", fuse=True).fused


def test_refuses_another_architecture_and_an_unimportable_scheduler(sd_dir, sdxl_dir, tmp_path):
    with pytest.raises(RayflowError, match="architecture"):
        export_pipeline(sd_dir, _lora_student(sdxl_dir), _ddim_trailing(), tmp_path / "out")
    local = type("LocalScheduler", (ToyFlowScheduler,), {})  # not reachable by module + class name
    with pytest.raises(RayflowError, match="cannot be imported"):
        export_pipeline(sd_dir, _lora_student(sd_dir), local(), tmp_path / "out")
    with pytest.raises(RayflowError, match="SchedulerMixin"):
        export_pipeline(sd_dir, _lora_student(sd_dir), object(), tmp_path / "out")


# ---------------------------------------------------------------------- a method's own sampler, and the CLI
def test_rectified_diffusion_stock_scheduler_equals_the_method_sampler(sd_dir, tmp_path):
    """The exported DPM-Solver++(1) trailing scheduler reproduces RectifiedDiffusion.sample at every N,
    including N = 3 where diffusers' DDIM(trailing) steps off the grid."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from rayflow.methods import get_method
    from rayflow.models.base import Denoiser
    from rayflow.pipelines.export import stock_scheduler
    from rayflow.schedules import VPSchedule

    method = get_method("rectified-diffusion")()
    teacher_schedule = VPSchedule.from_name("scaled_linear")
    unet = UNet2DConditionModel.from_pretrained(str(sd_dir / "unet"))
    with torch.no_grad():
        unet.conv_out.bias.add_(0.1)  # a full fine-tune, written as unet/
    sched = stock_scheduler(method, teacher_schedule, "epsilon")
    assert isinstance(sched, DPMSolverMultistepScheduler)
    export_pipeline(sd_dir, unet, sched, tmp_path / "rd")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "rd"))
    lat = _latents(sd_dir)
    text = _sd_text(sd_dir, lat.shape[0])

    class TextUNet(Denoiser):
        prediction_type = "epsilon"

        def forward(self, x, t, cond=None):
            return unet(x, t, encoder_hidden_states=text).sample

    for steps in (1, 2, 3):
        with torch.no_grad():
            want = method.sample(TextUNet(), lat.clone(), teacher_schedule, steps)
        torch.testing.assert_close(_run_pipeline(pipe, lat, steps), want, atol=1e-4, rtol=0)
    assert stock_scheduler(method, teacher_schedule, "flow") is None
    assert stock_scheduler(get_method("perflow")(), teacher_schedule, "epsilon") is None


def test_export_cli_refuses_pixel_space_students_and_non_students(tmp_path, capsys):
    from rayflow.cli import main

    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text(json.dumps({"kind": "student", "model": {"kind": "unet"}}))
    (student / "model.safetensors").write_bytes(b"")
    cases = [(student, "pixel-space"), (tmp_path / "missing", "does not exist"), (tmp_path, "no config.json")]
    for model, needle in cases:
        code = main(["export", "--model", str(model), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("rayflow: error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()
