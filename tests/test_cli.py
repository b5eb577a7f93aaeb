"""The command line end to end on tiny problems, and its contract for bad input: one line, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from rayflow.cli import main

MOG = "mog:dim=2,modes=4,std=0.1,seed=1,n=512"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rayflow: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    code = main(["train-teacher", "--data", MOG, "--out", str(out), "--max-steps", "60", "--batch-size", "64",
                 "--no-progress", "--checkpoint-every", "30"])
    assert code == 0
    return out


def test_train_sample_eval_round_trip(teacher_dir, tmp_path, capsys):
    cfg = json.loads((teacher_dir / "config.json").read_text())
    assert cfg["kind"] == "teacher" and cfg["data"].startswith("mog:") and cfg["model"]["num_classes"] == 4
    npz = tmp_path / "s.npz"
    code, out, err = run(capsys, "sample", "--model", str(teacher_dir), "--steps", "4", "--num", "50",
                         "--out", str(npz), "--sampler", "ddim", "--seed", "3")
    assert code == 0, err
    with np.load(npz) as f:
        assert f["x"].shape == (50, 2) and f["x"].dtype == np.float32
        assert f["labels"].tolist() == [i % 4 for i in range(50)]
    code, out, err = run(capsys, "eval", "--samples", str(npz), "--data", MOG, "--out", str(tmp_path / "ev"),
                         "--reference-num", "400", "--method", "teacher", "--nfe", "4")
    assert code == 0, err
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert rows[0]["method"] == "teacher" and rows[0]["nfe"] == 4 and rows[0]["sw"] > 0


def test_same_seed_same_samples(teacher_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert run(capsys, "sample", "--model", str(teacher_dir), "--steps", "3", "--num", "8",
                   "--out", str(tmp_path / f"{name}.npz"))[0] == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["x"], b["x"])


def test_exact_teacher_sampling(tmp_path, capsys):
    npz = tmp_path / "exact.npz"
    code, _, err = run(capsys, "sample", "--teacher", "exact", "--data", MOG, "--steps", "20", "--num", "40",
                       "--out", str(npz), "--labels", "2")
    assert code == 0, err
    with np.load(npz) as f:
        assert (f["labels"] == 2).all()
        ang = np.arctan2(f["x"][:, 1], f["x"][:, 0])  # mode 2 of the 4-mode ring sits at angle pi
        assert np.mean(np.abs(np.abs(ang) - np.pi) < 0.5) > 0.9


def test_resume_with_other_config_refused_and_checkpoint_kept(teacher_dir, capsys):
    before = sorted(p.name for p in (teacher_dir / "checkpoints").iterdir())
    code, _, err = run(capsys, "train-teacher", "--data", MOG, "--out", str(teacher_dir), "--max-steps", "90",
                       "--batch-size", "32", "--no-progress")
    assert_user_error(code, err, "another configuration", "batch_size")
    assert sorted(p.name for p in (teacher_dir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["train-teacher", "--data", "nonsense", "--out", "{tmp}/t"], ["unknown dataset", "nonsense"]),
        (["train-teacher", "--data", "mnist:path={tmp}/nowhere", "--out", "{tmp}/t"], ["nowhere"]),
        (["train-teacher", "--data", MOG, "--out", "{tmp}/t", "--batch-size", "0"], ["batch-size"]),
        (["sample", "--model", "{tmp}/missing", "--out", "{tmp}/s.npz"], ["missing"]),
        (["sample", "--teacher", "exact", "--data", "digits", "--out", "{tmp}/s.npz"], ["mog"]),
        (["sample", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/s.npz", "--steps", "0"], ["--steps"]),
        (["sample", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/s.txt"], [".npz"]),
        (["sample", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/s.npz", "--labels", "9"], ["--labels"]),
        (["sample", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/s.npz", "--sampler", "rk4"], ["rk4"]),
        (["eval", "--samples", "{tmp}/none.npz", "--data", MOG, "--out", "{tmp}/e"], ["none.npz"]),
        (["distill", "--method", "magic", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/d"], ["magic"]),
        (["distill", "--method", "reflow", "--teacher", "exact", "--data", MOG, "--out", "{tmp}/d",
          "--option", "no_such_option=1"], ["no_such_option"]),
        (["distill", "--method", "reflow", "--teacher", "exact", "--data", "digits", "--out", "{tmp}/d"], ["mog"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needles, tmp_path, capsys):
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_user_error(code, err, *needles)


def test_corrupt_weights_refused(teacher_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "sample", "--model", str(broken), "--out", str(tmp_path / "s.npz"))
    assert_user_error(code, err, "model.safetensors")


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rayflow.cli", "sample", "--model", str(tmp_path / "x"),
                           "--out", str(tmp_path / "s.npz")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("rayflow: error:")


def test_methods_lists_registry(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in ("reflow", "perflow", "rectified-diffusion", "proreflow"):
        assert name in out
