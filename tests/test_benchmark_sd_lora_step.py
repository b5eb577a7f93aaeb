"""The SD1.5 LoRA step benchmark's CPU dry run: both loops run, the JSON report is complete, a failing row is
recorded while the others still run, and bad arguments are refused with one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_lora_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sd_lora_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_dry_run_writes_the_report_and_survives_a_failed_row(bench, tmp_path, monkeypatch):
    run_bare = bench.run_bare

    def compile_fails(*args):
        if args[6]:  # the compiled bare row (torch.compile needs a C++ toolchain on a CPU; fail it on purpose)
            raise RuntimeError("simulated failure")
        return run_bare(*args)

    monkeypatch.setattr(bench, "run_bare", compile_fails)
    out = tmp_path / "sd.json"
    code = bench.main(["--tiny", "--allow-cpu", "--rows", "bare-eager,rayflow-eager,bare-compile", "--steps", "1",
                       "--warmup", "0", "--pool", "4", "--out", str(out)])
    assert code == 1  # one row failed, the others ran and the report was written
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert "simulated failure" in rows["bare-compile"]["error"]
    bare, rf = rows["bare-eager"], rows["rayflow-eager"]
    assert "error" not in rf and "error" not in bare, (rf.get("traceback"), bare.get("traceback"))
    assert rf["samples_per_s"] > 0 and rf["ms_per_step"] > 0 and bare["last_loss"] > 0
    assert report["rayflow_over_bare"] == {
        "eager": pytest.approx(rf["samples_per_s"] / bare["samples_per_s"], abs=1e-3)}
    assert report["parameters"]["trainable"] > 0 and report["parameters"]["total"] > report["parameters"]["trainable"]
    assert report["config"]["batch_size"] == 2 and report["versions"]["torch"] and report["command"]


def test_refusals(bench, tmp_path, capsys):
    assert bench.main(["--tiny", "--allow-cpu", "--rows", "nope", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rayflow: error:") and "nope" in err[0]
    assert not (tmp_path / "x.json").exists()
