"""Two processes on a CPU (gloo, launched by torchrun): the world comes from accelerate, both ranks train, one
writes, and an interrupted run resumes to the same weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = r'''
import json, sys
from pathlib import Path
import torch
from rayflow.models import ModelConfig, build_model
from rayflow.training import LossOutput, TrainConfig, Trainer, launch_accelerator

out, steps = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)

class Toy:
    """A toy objective with rank-local state (like RayFlow's Time Sampler): a running sum of its own draws."""
    calls = 0
    def __init__(self):
        self.seen = torch.zeros(2, dtype=torch.float64)
    def __call__(self, model, step, generator):
        Toy.calls += 1
        x = torch.randn(8, 2, generator=generator, device=generator.device)
        t = torch.randint(0, 100, (8,), generator=generator, device=generator.device).float()
        self.seen += x.double().sum(0)
        return LossOutput((model(x, t) - torch.sin(3 * x)).square().mean())
    def state_dict(self):
        return {"seen": self.seen.clone()}
    def load_state_dict(self, state):
        self.seen = state["seen"].clone()

acc = launch_accelerator()
assert acc is not None, "a 2-process launch must give an accelerator"
cfg = ModelConfig(kind="mlp", sample_shape=(2,), hidden=16, depth=1)
torch.manual_seed(0)
trainer = Trainer(build_model(cfg), Toy(), TrainConfig(max_steps=steps, batch_size=8, lr=3e-3, checkpoint_every=2,
                  log_every=1, progress=False, gradient_accumulation_steps=2), out, {"model": cfg.to_dict()},
                  accelerator=acc)
trainer.train()
with open(out / f"rank{acc.process_index}.json", "w") as f:
    json.dump({"world": acc.num_processes, "calls": Toy.calls, "seen": trainer.objective.seen.tolist()}, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, out: Path, steps: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_train_and_resume(tmp_path):
    _launch(tmp_path, tmp_path / "straight", 6)
    _launch(tmp_path, tmp_path / "resumed", 4)
    _launch(tmp_path, tmp_path / "resumed", 6)
    for rank in (0, 1):
        info = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        straight_info = json.loads((tmp_path / "straight" / f"rank{rank}.json").read_text())
        assert info["world"] == 2 and info["calls"] == 4  # two steps left after the resume, two micro-batches each
        # each rank resumed its own objective state, not rank 0's
        assert info["seen"] == straight_info["seen"]
    ranks = [json.loads((tmp_path / "straight" / f"rank{r}.json").read_text())["seen"] for r in (0, 1)]
    assert ranks[0] != ranks[1]
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000004" / "objective-rank1.safetensors").is_file()
    straight = (tmp_path / "straight" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == straight
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # one writer: no line twice
