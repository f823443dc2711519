"""Outputs never destroy anything: real folders and files in a temp dir, real SIGKILLs."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import rtn_args

from qcore import api
from qcore.cli import main
from qcore.errors import OutputError
from qcore.io import atomic_directory, check_output_dir, clean_leftovers, dumps_json


def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the output was refused")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_save_into_a_folder_with_other_files_is_refused_and_nothing_changes(
        tiny_folder, capsys, monkeypatch):
    target = tiny_folder / "results"
    target.mkdir()
    (target / "notes.txt").write_text("a week of notes")
    (target / "plot.png").write_bytes(b"\x89PNG")
    before = _snapshot(tiny_folder)
    monkeypatch.setattr(api, "load_model", _never_load)
    assert main(rtn_args(tiny_folder, "--save", str(target))) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(rtn_args(tiny_folder, "--save", str(target), "--overwrite")) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "only replaces a saved model folder" in err and "notes.txt" in err
    assert _snapshot(tiny_folder) == before


def test_save_to_the_current_directory_is_refused(tiny_folder, capsys, monkeypatch):
    monkeypatch.chdir(tiny_folder)
    before = _snapshot(tiny_folder)
    monkeypatch.setattr(api, "load_model", _never_load)
    for args in (["--save", "."], ["--save", ".", "--overwrite"], ["--save", ".."]):
        assert main(rtn_args(tiny_folder, *args)) == 2
        assert "current directory" in capsys.readouterr().err
    assert _snapshot(tiny_folder) == before


def test_save_over_an_input_is_refused_even_with_overwrite(tiny_folder, capsys, monkeypatch):
    monkeypatch.setattr(api, "load_model", _never_load)
    # the model folder is a model folder, so only the input rule protects it
    assert main(rtn_args(tiny_folder, "--save", str(tiny_folder / "tiny"), "--overwrite")) == 2
    assert "reads" in capsys.readouterr().err
    assert (tiny_folder / "tiny" / "config.json").exists()


def test_overwrite_replaces_a_saved_model(tiny_folder, capsys):
    out = tiny_folder / "q"
    assert main(rtn_args(tiny_folder, "--save", str(out), "--json")) == 0
    first = json.loads((out / "qcore.json").read_text())
    capsys.readouterr()
    assert main(rtn_args(tiny_folder, "--save", str(out), "--json")) == 2
    assert main(rtn_args(tiny_folder, "--save", str(out), "--json", "--overwrite",
                         "--scheme", "W8A16")) == 0
    second = json.loads((out / "qcore.json").read_text())
    assert first["scheme"]["name"] == "W4A16" and second["scheme"]["name"] == "W8A16"
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["calib.txt", "q", "tiny"]


@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_unwritable_save_path_fails_before_the_model_loads(tiny_folder, capsys, monkeypatch,
                                                           where):
    if where == "under-a-file":
        target = tiny_folder / "calib.txt" / "out"
        expected = "is a file"
    elif os.geteuid() == 0:  # root writes anywhere a mode allows nothing; sysfs refuses
        target = Path("/sys/qcore-test-output/out")
        expected = "cannot write in /sys"
    else:
        locked = tiny_folder / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
        expected = "cannot write in"
    monkeypatch.setattr(api, "load_model", _never_load)
    assert main(rtn_args(tiny_folder, "--save", str(target))) == 2
    assert expected in capsys.readouterr().err.replace("\n", " ")


def test_too_little_free_disk_is_refused_with_the_numbers(tiny_folder, capsys, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tiny_folder)
    monkeypatch.setattr("qcore.io.shutil.disk_usage",
                        lambda p: usage._replace(free=1024))
    monkeypatch.setattr(api, "load_model", _never_load)
    assert main(rtn_args(tiny_folder, "--save", str(tiny_folder / "q"))) == 2
    assert "MB needed, 0 MB free" in capsys.readouterr().err


def test_output_permissions_follow_the_umask(tiny_llama, tiny_tokenizer, plugins, tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qcore.io import atomic_directory

    target = Path(sys.argv[1])
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\\0" * (4 << 20))
        print("writing", flush=True)
        time.sleep(600)
""")


def _killed_mid_save(target: Path) -> int:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(target)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(tiny_llama, tiny_tokenizer,
                                                                 plugins, tmp_path, caplog):
    target = tmp_path / "out"
    pid = _killed_mid_save(target)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".out.tmp-{pid}-")
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec

    cfg = RunConfig(model="tiny", method="rtn", scheme="W8A16",
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=2,
                                                  seq_len=16), save=str(target))
    api.quantize(cfg, model=tiny_llama, tokenizer=tiny_tokenizer, plugins=plugins,
                 progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"left by killed process {pid}" in caplog.text
    api.load_model(str(target), plugins)


def test_a_kill_between_the_two_renames_restores_the_previous_output(tmp_path, caplog):
    dead = _killed_mid_save(tmp_path / "scratch")  # a pid that surely is not running
    clean_leftovers(tmp_path / "scratch")
    old = tmp_path / f".out.old-{dead}"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    assert clean_leftovers(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"previous"
    assert "restored" in caplog.text


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    live = tmp_path / f".out.tmp-{os.getpid()}-abc"
    live.mkdir()
    assert clean_leftovers(tmp_path / "out") == []
    assert live.exists()


def test_guard_accepts_new_and_empty_folders(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == (tmp_path / "empty").resolve()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "file")
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_json_never_holds_bare_nan():
    text = dumps_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "a": None, "b": [1.0, None], "c": {"d": None}}


def test_sizes_parse_with_units_and_bad_ones_are_named():
    from qcore.errors import ConfigError
    from qcore.io import parse_size

    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1GiB") == 2**30 and parse_size("1.5kb") == 1500
    assert parse_size(4096) == 4096 and parse_size("123") == 123
    for bad in ("lots", "5 XB", "0MB"):
        with pytest.raises(ConfigError, match=rf"`max_shard_size` {bad!r}"):
            parse_size(bad)
