import json
from importlib.metadata import EntryPoint

import pytest

from qcore import hookimpl
from qcore.cli import main
from qcore.interfaces import Quantizer
from qcore.plugins import DuplicateRegistration, PluginManager, UnknownName


class _Named(Quantizer):
    name = "dup"

    def quantize_layer(self, ctx):
        return {}


class PluginA:
    @hookimpl
    def qcore_register_quantizers(self, register):
        register(_Named)


class PluginB(PluginA):
    pass


def test_builtin_plugins_come_from_entry_points(plugins):
    names = {(r.kind, r.name) for r in plugins.registrations} or set()
    plugins.listing()
    names = {(r.kind, r.name) for r in plugins.registrations}
    for expected in [("quantizer", "rtn"), ("backend", "cpu"), ("evaluator", "perplexity"),
                     ("dataset", "pydoc"), ("dataset", "text"), ("dataset", "jsonl"),
                     ("format", "qcore"), ("architecture", "llama"), ("architecture", "qwen2")]:
        assert expected in names
    info = plugins.plugins["rtn"]
    assert info.distribution == "qcore" and info.version
    assert "qcore_register_quantizers" in info.hooks


def test_duplicate_registration_names_both_plugins():
    pm = PluginManager(load_entry_points=False, extra_plugins=[("a", PluginA()), ("b", PluginB())])
    with pytest.raises(DuplicateRegistration) as err:
        pm.registry("quantizer")
    assert "'a'" in str(err.value) and "'b'" in str(err.value) and "dup" in str(err.value)


def _fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr("qcore.plugins.entry_points", lambda group: eps)


def test_broken_plugin_is_reported_and_others_still_work(monkeypatch):
    eps = [
        EntryPoint(name="broken", value="qcore_no_such_module.plugin", group="qcore"),
        EntryPoint(name="rtn", value="qcore_rtn.plugin", group="qcore"),
    ]
    _fake_entry_points(monkeypatch, eps)
    pm = PluginManager()
    assert "rtn" in pm.registry("quantizer")
    (failure,) = pm.failures
    assert failure.name == "broken" and failure.stage == "import"
    assert "qcore_no_such_module" in failure.error
    with pytest.raises(UnknownName, match="broken"):
        pm.get("quantizer", "missing")


def test_plugin_failing_at_registration_is_isolated():
    class Exploding:
        @hookimpl
        def qcore_register_quantizers(self, register):
            raise RuntimeError("boom")

    pm = PluginManager(extra_plugins=[("exploding", Exploding())])
    assert "rtn" in pm.registry("quantizer")
    assert any(f.name == "exploding" and f.stage == "register" and "boom" in f.error
               for f in pm.failures)


def test_environment_variable_blocks_plugins(monkeypatch):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "rtn, perplexity")
    pm = PluginManager()
    assert "rtn" not in pm.registry("quantizer")
    assert "perplexity" not in pm.registry("evaluator")
    assert "cpu" in pm.registry("backend")
    assert pm.listing()["blocked"] == ["perplexity", "rtn"]


def test_unknown_name_lists_available(plugins):
    with pytest.raises(UnknownName, match="available: .*rtn"):
        plugins.get("quantizer", "nope")


def test_register_modules_hook():
    class Mod:
        @hookimpl
        def qcore_register_modules(self, register):
            register("my-transform", dict)

    pm = PluginManager(load_entry_points=False, extra_plugins=[("mod", Mod())])
    assert pm.registry("module") == {"my-transform": dict}


def test_list_plugins_cli_table_and_json(capsys):
    assert main(["list-plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = next(r for r in data["registrations"] if r["name"] == "rtn")
    assert row["kind"] == "quantizer" and row["distribution"] == "qcore"
    assert row["hooks"] == ["qcore_register_quantizers"]
    assert main(["list-plugins"]) == 0
    table = capsys.readouterr().out
    assert "quantizer" in table and "perplexity" in table
