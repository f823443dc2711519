import json
import os
import signal
import subprocess
import sys
import time

import yaml

from qcore.cli import main


def _write_grid(grid, path):
    path.write_text(yaml.safe_dump(grid.model_dump(mode="json")))
    return path


def test_study_command_prints_table_and_findings(make_grid, tmp_path, capsys, one_thread):
    path = _write_grid(make_grid(), tmp_path / "grid.yaml")
    assert main(["study", str(path), "--out", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "tiny study" in text and "ppl_vs_fp" in text and "W4A4" in text
    assert "1. 4-bit weight-only quantization: W4A16: on tiny the best method (rtn)" in text
    assert "4 cells (0 cached, 4 run, 0 with failures)" in text

    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reused"] == 4 and data["ran"] == 0 and len(data["rows"]) == 4
    assert {f["id"] for f in data["findings"]} == {"weight-only-4bit",
                                                   "weight-activation-4bit", "eight-bit",
                                                   "int8-kernel"}


def test_bad_grid_exits_with_every_problem(make_grid, tmp_path, capsys):
    grid = make_grid(methods=[{"method": "nope"}], schemes=["W9A9"])
    path = _write_grid(grid, tmp_path / "grid.yaml")
    assert main(["study", str(path), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "W9A9" in err and not (tmp_path / "s").exists()


def test_killed_study_resumes_where_it_stopped(make_grid, tmp_path, capsys):
    """A real SIGKILL in the middle of the second cell; the rerun keeps the first."""
    path = _write_grid(make_grid(), tmp_path / "grid.yaml")
    out = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "qcore.cli", "study", str(path), "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        cells = out / "cells"
        if cells.is_dir() and len(list(cells.iterdir())) >= 2:  # the baseline is complete
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.md").exists()  # the study never got to its table

    assert main(["study", str(path), "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reused"] >= 1 and data["ran"] >= 1 and data["reused"] + data["ran"] == 4
    assert all(r["status"] == "ok" for r in data["rows"])
