"""The Stable Diffusion path under `accelerate launch --multi_gpu --num_processes 2` on a CPU (gloo): both ranks
preprocess, make pairs and train, only rank 0 writes, and a run interrupted after one step and resumed ends with
the same LoRA as an uninterrupted one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayflow.testing import build_tiny_caption_folder, build_tiny_sd_pipeline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(pipe: Path, caps: Path, out: Path, cache: Path, steps: int) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "rayflow", "distill", "--method", "reflow",
           "--teacher", str(pipe), "--data", f"captions:path={caps}", "--out", str(out), "--cache", str(cache),
           "--max-steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1",
           "--no-progress", "--lora-rank", "4", "--resolution", "16", "--option", "pair_steps=1",
           "--pool-size", "4", "--compile", "no"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_two_processes_distil_a_lora_student_and_resume(tmp_path):
    pipe = build_tiny_sd_pipeline(tmp_path / "pipe")
    caps = build_tiny_caption_folder(tmp_path / "caps", n=8, size=16)
    straight = _launch(pipe, caps, tmp_path / "straight", tmp_path / "cache", 2)
    assert straight.count("student of") == 2  # both ranks ran to the end (only rank 0 writes: the log below)
    _launch(pipe, caps, tmp_path / "resumed", tmp_path / "cache", 1)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")) == ["step-0000001"]
    _launch(pipe, caps, tmp_path / "resumed", tmp_path / "cache", 2)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a and all("lora_" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # one writer, no line twice
