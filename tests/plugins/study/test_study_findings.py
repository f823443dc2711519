from qcore_study.findings import findings, findings_markdown, layer_spread


def _row(method, scheme, ppl, layers=(), params=0, **metrics):
    evals = {"perplexity": {"perplexity": ppl}} if ppl is not None else {}
    if metrics:
        evals["other"] = metrics
    return {"model": "m", "method": method, "scheme": scheme, "backend": "cpu",
            "status": "ok", "evals": evals, "parameters": params,
            "layers": [{"name": f"l{i}", "relative_mse": e} for i, e in enumerate(layers)]}


def test_findings_state_the_measured_numbers():
    rows = [_row("fp", "fp", 10.0, params=135e6, forward_seconds=1.0),
            _row("rtn", "W4A16", 12.0, layers=[1e-3, 2e-3, 4e-3]),
            _row("gptq", "W4A16", 11.0, layers=[1e-3, 1e-3, 1e-3]),
            _row("rtn", "W4A4", 50.0, layers=[0.01, 0.02, 0.5]),
            _row("sq", "W8A8", 10.1, layers=[1e-4, 2e-4, 1e-4], int_kernel_calls=10.0,
                 activation_quant_share_of_int_linear=0.25, activation_quant_share=0.1,
                 forward_seconds=1.5)]
    one, two, three, four = findings(rows)
    assert "best method (gptq) is within 10.0%" in one.statement
    assert "the worst (rtn) 20.0%" in one.statement and "second model" in one.statement
    assert "rtn at 5.00x float perplexity" in two.statement
    assert "worst-layer error 25.0x the median (layer 2" in two.statement
    assert "at most 2.0x its median" in two.statement
    assert "sq W8A8 within 1.00% of float" in three.statement
    assert "25% of the int8 linears' time" in four.statement
    assert "1.50x the float one's time" in four.statement
    assert "**4-bit weight-only quantization.** W4A16" in findings_markdown([one])


def test_findings_name_what_is_missing():
    items = findings([_row("rtn", "W4A16", 12.0)])  # no baseline
    assert all(f.statement is None and f.missing for f in items)
    assert "float baseline" in items[0].missing and "kernel-time" in items[3].missing


def test_trend_with_size_needs_two_models():
    rows = [_row("fp", "fp", 10.0, params=1e9), _row("rtn", "W4A16", 11.0)]
    rows += [{**_row("fp", "fp", 8.0, params=7e9), "model": "big"},
             {**_row("rtn", "W4A16", 8.4), "model": "big"}]
    statement = findings(rows)[0].statement
    assert "shrinks: m (1B params) 10.0% -> big (7B params) 5.0%" in statement


def test_layer_spread_prefers_the_layer_error_evaluator():
    row = _row("rtn", "W4A4", 50.0, layers=[1.0, 2.0, 3.0], worst_over_median=7.0,
               worst_layer=1.0, max_alone=0.2)
    assert layer_spread(row) == (7.0, 1, 0.2)
    assert layer_spread(_row("rtn", "W4A4", 50.0, layers=[1.0, 2.0, 6.0])) == (3.0, 2, 6.0)
