"""Benchmark tables are written to results/<bench>.md under the machine they ran on."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from results import cpu_model, run_recorded, write_results  # noqa: E402


def test_results_file_carries_the_machine_then_the_table(tmp_path):
    table = "| model | ms |\n|---|---|\n| resnet50 | 17.2 |"
    path = write_results("optim_step", table, results_dir=tmp_path)
    text = path.read_text()
    assert path == tmp_path / "optim_step.md"
    title, header, body = text.split("\n\n", 2)
    assert title == "# optim_step"
    assert body.strip() == table
    assert f"{cpu_model()}, {os.cpu_count()} cores" in header
    assert f"torch {torch.__version__}" in header and f"Python {platform.python_version()}" in header
    assert "load average at the end" in header and "date (UTC)" in header
    assert ("none visible" in header) != torch.cuda.is_available()


def test_run_recorded_writes_what_main_printed_unless_it_printed_nothing(tmp_path, monkeypatch, capsys):
    import results

    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(results.write_results, "__defaults__", (tmp_path,))
    assert run_recorded("toy", lambda: print("| a |\n|---|\n| 1 |") or 0) == 0
    assert (tmp_path / "toy.md").read_text().endswith("| a |\n|---|\n| 1 |\n")
    assert "| a |" in capsys.readouterr().out  # still printed
    assert run_recorded("silent", lambda: 1) == 1
    assert not (tmp_path / "silent.md").exists()
    assert run_recorded("worker", lambda: print("{}"), record=False) is None
    assert not (tmp_path / "worker.md").exists()
    assert run_recorded("toy", lambda: print("| b |\n|---|\n| 2 |"), variant="host") is None
    assert (tmp_path / "toy_host.md").read_text().endswith("| b |\n|---|\n| 2 |\n")
    assert (tmp_path / "toy.md").read_text().endswith("| a |\n|---|\n| 1 |\n")  # the main table stays
