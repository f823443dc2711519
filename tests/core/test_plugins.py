import json
from importlib.metadata import EntryPoint

import pytest

from qcore import hookimpl
from qcore.cli import main
from qcore.interfaces import Quantizer
from qcore.plugins import PluginError, PluginManager, UnknownName


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


def test_duplicate_registration_keeps_the_first_and_reports_the_second():
    pm = PluginManager(load_entry_points=False, extra_plugins=[("a", PluginA()), ("b", PluginB())])
    assert pm.registry("quantizer") == {"dup": _Named}
    assert pm.registrations[0].plugin == "a"
    (failure,) = pm.failures
    assert failure.name == "b" and failure.stage == "contract"
    assert "'dup'" in failure.error and "'a'" in failure.error


def _fake_entry_points(monkeypatch, eps):
    monkeypatch.setattr("qcore.plugins.discovery.entry_points", lambda group: eps)


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
    assert row["hooks"] == ["qcore_register_quantizers", "qcore_register_solvers"]
    assert main(["list-plugins"]) == 0
    table = capsys.readouterr().out
    assert "quantizer" in table and "perplexity" in table


# ----------------------------------------------------------------------------- isolation
class _FakeRTN(Quantizer):
    name = "rtn"

    def quantize_layer(self, ctx):
        return {}


class _Hijacker:
    """A third-party plugin that registers a quantizer under a built-in name."""

    @hookimpl
    def qcore_register_quantizers(self, register):
        register(_FakeRTN)


def _with_third_party(monkeypatch, name, obj):
    real = __import__("importlib.metadata", fromlist=["entry_points"]).entry_points
    module = type("module", (), {})()
    for attr in dir(obj):
        if attr.startswith("qcore_"):
            setattr(module, attr, getattr(obj, attr))
    ep = EntryPoint(name=name, value="tests_fake:plugin", group="qcore")
    monkeypatch.setattr(EntryPoint, "load", lambda self: module if self.name == name
                        else __import__(self.module, fromlist=["_"]))
    monkeypatch.setattr("qcore.plugins.discovery.entry_points",
                        lambda group: [*real(group=group), ep])


def test_third_party_registering_a_builtin_name_is_left_out(monkeypatch, capsys):
    # entry points load by name: "aaa" registers before qcore's "rtn", and still loses
    _with_third_party(monkeypatch, "aaa-hijack", _Hijacker())
    pm = PluginManager()
    assert pm.registry("quantizer")["rtn"].__module__ == "qcore_rtn.quantizer"
    failure = next(f for f in pm.failures if f.name == "aaa-hijack")
    assert "already registered by plugin 'rtn'" in failure.error
    monkeypatch.setattr("qcore_commands.core_commands.get_plugin_manager", lambda: pm)
    assert main(["list-plugins"]) == 0
    out = capsys.readouterr().out
    assert "aaa-hijack" in out and "left out" in out and "qcore_rtn.plugin" in out


def test_hook_with_a_wrong_argument_is_left_out(monkeypatch):
    class WrongArgs:
        @hookimpl
        def qcore_register_quantizers(self, registr):
            registr(_FakeRTN)

    pm = PluginManager(extra_plugins=[("wrong-args", WrongArgs())])
    assert "rtn" in pm.registry("quantizer")
    (failure,) = [f for f in pm.failures if f.name == "wrong-args"]
    assert failure.stage == "validate" and "registr" in failure.error


def test_misspelt_hook_name_is_left_out():
    class Misspelt:
        @hookimpl
        def qcore_layer_quantised(self, report):
            pass

    pm = PluginManager(load_entry_points=False, extra_plugins=[("misspelt", Misspelt())])
    (failure,) = pm.failures
    assert "qcore_layer_quantised" in failure.error and "misspelt" in failure.error
    assert "misspelt" not in pm.plugins


class _NoContract:
    """Registered as a quantizer but not a Quantizer (no Config, no quantize_layer)."""

    name = "broken-method"


class _Abstract(Quantizer):
    name = "abstract-method"


class _BadContracts:
    @hookimpl
    def qcore_register_quantizers(self, register):
        register(_NoContract)
        register(_Abstract)
        register(_Named)


def test_registration_breaking_its_contract_is_left_out_with_the_reason(capsys, monkeypatch):
    pm = PluginManager(extra_plugins=[("bad", _BadContracts())])
    registry = pm.registry("quantizer")
    assert "dup" in registry and "rtn" in registry
    assert "broken-method" not in registry and "abstract-method" not in registry
    errors = {f.error for f in pm.failures if f.name == "bad"}
    assert any("not a subclass of qcore.interfaces.Quantizer" in e for e in errors)
    assert any("does not implement quantize_layer" in e for e in errors)
    monkeypatch.setattr("qcore_commands.core_commands.get_plugin_manager", lambda: pm)
    assert main(["list-plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {f["stage"] for f in data["failures"]} == {"contract"}


def test_unknown_blocked_name_warns(monkeypatch, caplog, capsys):
    monkeypatch.setenv("QCORE_BLOCK_PLUGINS", "rtn,no-such-plugin")
    pm = PluginManager()
    assert pm.unknown_blocked == ["no-such-plugin"]
    assert "no-such-plugin" in caplog.text
    monkeypatch.setattr("qcore_commands.core_commands.get_plugin_manager", lambda: pm)
    assert main(["list-plugins"]) == 0
    assert "'no-such-plugin', which is not an installed plugin" in capsys.readouterr().out


def test_list_plugins_keeps_names_whole_on_a_narrow_terminal(monkeypatch, capsys):
    from rich.console import Console

    narrow = Console(width=60, force_terminal=False)
    monkeypatch.setattr("qcore.console.out", narrow)
    monkeypatch.setattr("qcore_commands.core_commands.out", narrow)
    assert main(["list-plugins"]) == 0
    table = capsys.readouterr().out
    for name in ("smoothquant", "qcore-format", "architecture", "perplexity"):
        assert name in table
    assert "…" not in table


# ----------------------------------------------------------------------------- runs, events
class _Events:
    def __init__(self):
        self.layers, self.finished = [], []

    @hookimpl
    def qcore_layer_quantized(self, report):
        self.layers.append(report.index)

    @hookimpl
    def qcore_evaluation_finished(self, result):
        self.finished.append(result.evaluator)


def _tiny_run(plugins, tiny_tokenizer, listeners=()):
    from conftest import make_tiny_model

    from qcore import api
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec

    cfg = RunConfig(model="tiny", method="rtn", scheme="W8A16",
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=2,
                                                  seq_len=16))
    return api.quantize(cfg, model=make_tiny_model("llama"), tokenizer=tiny_tokenizer,
                        plugins=plugins, listeners=listeners, progress=False)


def test_listeners_belong_to_their_run_and_plugins_hear_events_too(tiny_tokenizer):
    from qcore import api

    installed = _Events()
    plugins = PluginManager(extra_plugins=[("installed", installed)])
    before = set(plugins.plugins)
    mine = _Events()
    result = _tiny_run(plugins, tiny_tokenizer, listeners=[mine])
    assert mine.layers == [0, 1] and installed.layers == [0, 1]
    assert set(plugins.plugins) == before  # the shared manager never saw the listener
    _tiny_run(plugins, tiny_tokenizer)
    assert mine.layers == [0, 1] and installed.layers == [0, 1, 0, 1]
    api.evaluate(result.model, tiny_tokenizer, "perplexity",
                 {"data": {"source": "pydoc"}, "seq_len": 16, "windows": 1}, plugins=plugins,
                 listeners=[mine])
    assert mine.finished == ["perplexity"] and installed.finished == ["perplexity"]


def test_a_listener_with_a_misspelt_hook_is_an_error_naming_it(tiny_tokenizer, plugins):
    class Typo:
        @hookimpl
        def qcore_layer_quantised(self, report):
            pass

    with pytest.raises(PluginError, match="qcore_layer_quantised"):
        _tiny_run(plugins, tiny_tokenizer, listeners=[Typo()])


def test_registration_hooks_go_through_pluggy(plugins):
    seen = []
    undo = plugins.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])),
        lambda *args: None)
    try:
        plugins._registries = None
        plugins.registry("solver")
    finally:
        undo()
    assert ("qcore_register_solvers", ["gptq"]) in seen
    assert ("qcore_register_solvers", ["rtn"]) in seen


def test_a_plugin_command_that_fails_leaves_the_others(monkeypatch, capsys):
    from qcore import cli

    class Good:
        @hookimpl
        def qcore_register_commands(self, subparsers):
            p = subparsers.add_parser("hello", help="says hello")
            p.set_defaults(func=lambda args: print("hello") or 0)

    class Bad:
        @hookimpl
        def qcore_register_commands(self, subparsers):
            raise RuntimeError("broken command")

    pm = PluginManager(extra_plugins=[("good", Good()), ("bad", Bad())])
    monkeypatch.setattr(cli, "get_plugin_manager", lambda: pm)
    assert main(["hello"]) == 0 and capsys.readouterr().out == "hello\n"
    assert any(f.name == "bad" and "broken command" in f.error for f in pm.failures)
