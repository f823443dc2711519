import csv
import json
import logging
import math

import pytest

from qcore import api
from qcore.errors import ConfigError
from qcore_study import executors as executors_module
from qcore_study import run_study
from qcore_study.cache import StudyLock
from qcore_study.cells import run_cell, tensor_bytes


def _rows(result):
    return {(r["method"], r["scheme"]): r for r in result.rows}


def test_study_table_matches_the_api_on_the_same_model(make_grid, tmp_path, tiny_folder,
                                                       one_thread):
    grid = make_grid()
    result = run_study(grid, tmp_path / "study")
    rows = _rows(result)
    assert result.cells == 4 and result.ran == 4 and result.reused == 0 and not result.failed
    assert all(r["status"] == "ok" for r in result.rows)

    # the cached W4A16 model evaluates to the table's perplexity, and weighs what it says
    w4 = rows["rtn", "W4A16"]
    saved = result.root / "cells" / w4["key"] / "model"
    model, tokenizer, meta = api.load_model(str(saved))
    assert meta["scheme"]["weights"]["group_size"] == 32
    ppl = api.perplexity(model, tokenizer, grid.evaluators[0].options["data"]["source"],
                         seq_len=16, windows=2)
    assert w4["evals"]["perplexity"]["perplexity"] == pytest.approx(ppl, rel=1e-6)
    assert w4["size_mb"] * 2**20 == tensor_bytes(model)

    fp = rows["fp", "fp"]
    assert w4["ppl_vs_fp"] == pytest.approx(w4["evals"]["perplexity"]["perplexity"]
                                            / fp["evals"]["perplexity"]["perplexity"])
    float_model, _, _ = api.load_model(str(tiny_folder / "tiny"))
    assert fp["parameters"] == sum(p.numel() for p in float_model.parameters())
    assert fp["size_mb"] * 2**20 == tensor_bytes(float_model)
    # kernel-time on W8A8: the real int8 kernel ran for every linear of the forward
    kt = rows["rtn", "W8A8"]["evals"]["kernel-time"]
    assert kt["int_kernel_calls"] == 2 * 7 and 0 < kt["activation_quant_share"] < 1
    assert fp["evals"]["kernel-time"]["int_kernel_calls"] == 0
    assert "layer-error" not in fp["evals"]
    assert rows["rtn", "W4A4"]["evals"]["layer-error"]["max_alone"] > \
        rows["rtn", "W8A8"]["evals"]["layer-error"]["max_alone"]

    # files: markdown, csv with every metric, json, findings, plots
    md = (result.root / "results.md").read_text()
    assert md.count("\n") == 2 + 4 and "| tiny | rtn | W4A4 | cpu | ok |" in md
    table = list(csv.DictReader((result.root / "results.csv").open()))
    assert {r["scheme"] for r in table} == {"fp", "W4A16", "W8A8", "W4A4"}
    row = next(r for r in table if r["scheme"] == "W4A16")
    assert math.isclose(float(row["perplexity.perplexity"]), ppl, rel_tol=1e-6)
    assert "layer-error.final_accumulated" in row
    data = json.loads((result.root / "results.json").read_text())
    assert data["cells"] == 4 and len(data["findings"]) == 4
    findings = (result.root / "findings.md").read_text()
    assert "within" in findings and "dynamic activation quantization" in findings
    assert len(result.files["plots"]) == 2
    assert all((result.root / "plots").glob("*.png"))


def test_rerun_after_a_kill_runs_only_the_unfinished_cells(make_grid, tmp_path, monkeypatch,
                                                           one_thread):
    grid = make_grid()
    out = tmp_path / "study"
    calls = []

    def dies_on_third(plan, root, plugins=None):
        calls.append(plan.cell.label)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill: nothing of this cell is written
        return run_cell(plan, root, plugins)

    monkeypatch.setattr(executors_module, "run_cell", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_study(grid, out)
    monkeypatch.undo()
    first = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}

    lines = []
    result = run_study(grid, out, report=lines.append)
    assert result.reused == 2 and result.ran == 2
    assert lines[0].startswith("4 cells: 2 cached, 2 to run")
    assert lines[0].endswith("at the cached cells' pace")  # an estimate from their records
    first_done = next(x for x in lines if x.startswith("[1/2]") and "done" in x)
    assert "left" in first_done and not [x for x in lines if x.startswith("[2/2]")
                                          and "left" in x]
    after = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert len(first) >= 5 and all(after[p] == stamp for p, stamp in first.items())
    assert all(r["status"] == "ok" for r in result.rows)
    # and a third run has nothing to do
    assert run_study(grid, out).ran == 0


def test_a_corrupted_cache_entry_is_recomputed_with_a_warning(make_grid, tmp_path, caplog,
                                                              one_thread):
    grid = make_grid(methods=[{"method": "rtn", "schemes": ["W4A16"]}],
                     evaluators=make_grid().evaluators[:1])
    out = tmp_path / "study"
    row = _rows(run_study(grid, out))["rtn", "W4A16"]
    before = row["evals"]["perplexity"]
    (entry,) = (out / "cells" / row["key"]).glob("eval-perplexity-*.json")
    entry.write_text('{"key": "x", "metr')
    with caplog.at_level(logging.WARNING):
        result = run_study(grid, out)
    assert result.ran == 1 and "unreadable" in caplog.text and str(entry) in caplog.text
    assert _rows(result)["rtn", "W4A16"]["evals"]["perplexity"] == before
    assert json.loads(entry.read_text())["metrics"] == before


def test_a_failing_cell_is_recorded_and_the_others_run(make_grid, tmp_path, one_thread):
    grid = make_grid(methods=[{"method": "rtn", "schemes": ["W4A16"]},
                              {"method": "rtn", "name": "rtn-g48", "group_size": 48,
                               "schemes": ["W4A16"]}],
                     evaluators=make_grid().evaluators[:1])
    result = run_study(grid, tmp_path / "study")
    rows = _rows(result)
    assert rows["rtn", "W4A16"]["status"] == "ok"
    bad = rows["rtn-g48", "W4A16"]
    assert bad["status"] == "failed" and result.failed == ["tiny / rtn-g48 / W4A16 / cpu"]
    assert "48" in bad["errors"]["quantize"] and "64" in bad["errors"]["quantize"]
    assert "rtn-g48" in (tmp_path / "study" / "results.md").read_text()


def test_a_second_study_on_the_same_folder_is_refused(make_grid, tmp_path):
    out = tmp_path / "study"
    with StudyLock(out), pytest.raises(ConfigError, match=r"study\.lock"):
        run_study(make_grid(), out)


def test_a_folder_that_is_not_a_study_is_refused(make_grid, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a qcore study folder"):
        run_study(make_grid(), tmp_path / "mine")
