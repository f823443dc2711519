import pytest
import torch

from qcore.data import DatasetRegistry, WindowSpec, select_part, split_point, token_windows
from qcore.interfaces import DataSpec


def test_split_at_the_first_article_title_past_the_middle():
    text = " = A = \n\nfirst article body.\n\n = B = \n\n" + "x" * 40 + "\n = C = \n\nlast\n"
    cut = split_point(text)
    assert text[cut:].startswith(" = C = ")
    assert select_part(text, "head") + select_part(text, "tail") == text


def test_split_falls_back_to_a_blank_line():
    text = "para one.\n\npara two is here.\n\npara three.\n"
    assert select_part(text, "tail") == "para three.\n"


def test_consecutive_windows_from_the_start():
    ids = torch.arange(100)
    w = token_windows(ids, WindowSpec(samples=3, seq_len=10))
    assert torch.equal(w, torch.arange(30).reshape(3, 10))
    with pytest.raises(ValueError, match="need 1100 tokens"):
        token_windows(ids, WindowSpec(samples=11, seq_len=100))


def test_random_windows_are_seeded():
    ids = torch.arange(1000)
    a = token_windows(ids, WindowSpec(samples=4, seq_len=16, sampling="random", seed=3))
    b = token_windows(ids, WindowSpec(samples=4, seq_len=16, sampling="random", seed=3))
    c = token_windows(ids, WindowSpec(samples=4, seq_len=16, sampling="random", seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows


def test_registry_detects_and_names_sources(plugins, tmp_path):
    reg = DatasetRegistry(plugins.registry("dataset"))
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"question": "q1", "answer": "a1"}\n{"question": "q2",'
                                      ' "answer": "a2"}\n')
    assert reg.text(DataSpec(source=str(tmp_path / "a.txt"))) == "hello world"
    assert reg.text(DataSpec(source=str(tmp_path / "b.jsonl"))) == "q1\na1\n\nq2\na2"
    assert reg.text(DataSpec(source=str(tmp_path / "b.jsonl"), field="answer")) == "a1\n\na2"
    pydoc = reg.text(DataSpec(source="pydoc"))
    assert len(pydoc) > 100_000 and "assert" in pydoc
    assert reg.text(DataSpec(source="pydoc")) == pydoc  # deterministic
    with pytest.raises(ValueError, match="no dataset plugin"):
        reg.text(DataSpec(source="unknown.bin"))
    with pytest.raises(ValueError, match="not registered"):
        reg.text(DataSpec(source="x", dataset="nope"))
    with pytest.raises(ValueError, match="b.jsonl:1: no field 'text2'"):
        reg.text(DataSpec(source=str(tmp_path / "b.jsonl"), field="text2"))


def test_hf_source_needs_datasets_or_names_the_format(plugins):
    reg = DatasetRegistry(plugins.registry("dataset"))
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            reg.text(DataSpec(source="hf:wikitext:test"))
    else:
        with pytest.raises(ValueError, match="hf:NAME"):
            reg.text(DataSpec(source="hf:a:b:c:d"))
