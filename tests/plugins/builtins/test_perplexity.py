import math

import pytest
import torch

from qcore import api
from qcore.data import tokenize
from qcore.interfaces import DataSpec
from qcore_builtins.evaluators import window_plan


def test_window_plan_non_overlapping_and_strided():
    assert window_plan(35, 10, 10, None) == [(0, 10, 9), (10, 20, 9), (20, 30, 9)]
    assert window_plan(35, 10, 10, 2) == [(0, 10, 9), (10, 20, 9)]
    # stride 5: later windows score only the 5 new tokens
    assert window_plan(20, 10, 5, None) == [(0, 10, 9), (5, 15, 5), (10, 20, 5)]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_perplexity_equals_transformers_loss(kind, tiny_tokenizer, plugins):
    from conftest import make_tiny_model

    model = make_tiny_model(kind)
    spec = DataSpec(source="pydoc", part="tail")
    result = api.evaluate(model, tiny_tokenizer, "perplexity",
                          {"data": spec, "seq_len": 64, "windows": 5, "batch_size": 2},
                          plugins=plugins)
    ids = tokenize(tiny_tokenizer, api.datasets(plugins).text(spec))
    with torch.no_grad():
        losses = [model(input_ids=ids[i * 64:(i + 1) * 64][None],
                        labels=ids[i * 64:(i + 1) * 64][None]).loss for i in range(5)]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert result.metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result.metrics["tokens_scored"] == 5 * 63 and result.metrics["windows"] == 5


def test_perplexity_fires_the_evaluation_event_and_validates(tiny_llama, tiny_tokenizer,
                                                             plugins):
    from qcore import hookimpl

    seen = []

    class Listener:
        @hookimpl
        def qcore_evaluation_finished(self, result):
            seen.append(result)

    plugins.add_plugin(Listener(), name="listener")
    api.evaluate(tiny_llama, tiny_tokenizer, "perplexity",
                 {"data": DataSpec(source="pydoc"), "seq_len": 32, "windows": 2},
                 plugins=plugins)
    assert seen and seen[0].evaluator == "perplexity"
    with pytest.raises(ValueError, match="seq_len"):
        api.build_evaluator("perplexity", {"data": {"source": "pydoc"}, "seq_len": 1}, plugins)
    with pytest.raises(ValueError, match="only"):
        api.evaluate(tiny_llama, tiny_tokenizer, "perplexity",
                     {"data": DataSpec(source="pydoc"), "seq_len": 64, "windows": 10**6},
                     plugins=plugins)


def test_logits_in_chunks_score_what_whole_batches_score(tiny_tokenizer, plugins):
    from conftest import make_tiny_model

    model = make_tiny_model("qwen2")
    options = {"data": DataSpec(source="pydoc", part="tail"), "seq_len": 64, "windows": 4,
               "batch_size": 2}
    results = [api.evaluate(model, tiny_tokenizer, "perplexity", {**options, "logit_chunk": c},
                            plugins=plugins).metrics["perplexity"] for c in (7, 64, 4096)]
    assert results[0] == pytest.approx(results[2], rel=1e-6)
    assert results[1] == pytest.approx(results[2], rel=1e-6)
