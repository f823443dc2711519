"""Helpers every method benchmark shares, on both sides (qcore's venv and the peer's).

Imports nothing from qcore at import time: the peer's side runs in llm-compressor's own
environment (only the parent's write_wiki_windows uses qcore, inside the function)."""

from __future__ import annotations

import math
from pathlib import Path

#: the standard calibration/evaluation text (DESIGN.md), beside the project's checkout
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_en.txt"


def window_perplexity(model, eval_ids, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the windows (rows of eval_ids), every position after
    the first scored; the same function scores both sides of a comparison."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, eval_ids.shape[0], batch_size):
            batch = eval_ids[start: start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def load_fp32(folder: str):
    """A plain HF folder as a float32 causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def llmc_oneshot(model, tokenizer, calib, recipe) -> float:
    """llm-compressor's ``oneshot`` over the calibration token windows ``calib`` (in
    order, all of them); its seconds. Peer side: llm-compressor's venv only."""
    import time

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MB (VmHWM; getrusage without /proc)."""
    import resource
    from pathlib import Path

    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def write_wiki_windows(folder, seq_len: int, eval_windows: int, calib_samples,
                       workdir) -> tuple[dict, object]:
    """Token-id files of the standard wiki setting, written once in the parent so the peer
    never imports qcore: ``calib{N}.pt`` with N consecutive calibration windows of the
    head for each N in ``calib_samples``, and ``eval.pt`` with the first ``eval_windows``
    windows of the tail (tokenized at once). Returns ({N: path}, eval path).

    Parent side only: it imports qcore."""
    from pathlib import Path

    import torch
    from transformers import AutoTokenizer

    from qcore.data import WindowSpec, select_part, token_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = WIKI.read_text()
    head = tokenize(tokenizer, select_part(text, "head"))
    tail = tokenize(tokenizer, select_part(text, "tail"))
    workdir = Path(workdir)
    calib = {}
    for n in sorted(set(calib_samples)):
        calib[n] = workdir / f"calib{n}.pt"
        torch.save(token_windows(head, WindowSpec(samples=n, seq_len=seq_len)), calib[n])
    eval_file = workdir / "eval.pt"
    torch.save(token_windows(tail, WindowSpec(samples=eval_windows, seq_len=seq_len)),
               eval_file)
    return calib, eval_file


def quantize_with_qcore(model_folder, calib_file, method: str, scheme, options: dict,
                        threads: int, batch_size: int = 4, propagation: str | None = None):
    """The qcore side of a comparison: load the float model, quantize it layer by layer on
    the CPU backend with the calibration token ids in ``calib_file`` (``propagation``: the
    run's override of the method's, like ``--propagation``). Returns (model, report,
    seconds of the quantization call). Worker side, qcore's venv only."""
    import time

    import torch

    from qcore import api
    from qcore.pipeline import check_group_size, run_layerwise
    from qcore.plugins import PluginManager

    torch.set_num_threads(threads)
    calib = torch.load(calib_file)
    model = load_fp32(model_folder)
    plugins = PluginManager()
    quantizer = api.build_quantizer(method, scheme, options, plugins)
    adapter = api.adapter_for(model, plugins)
    check_group_size(model, adapter, scheme)
    if not quantizer.uses_calibration():  # as qcore.api.quantize: the error windows only
        calib = calib[:4]
    t0 = time.perf_counter()
    report = run_layerwise(model, quantizer, adapter, api.build_backend("cpu", plugins), calib,
                           plugins=plugins, batch_size=batch_size, progress=False,
                           propagation=propagation)
    return model, report, time.perf_counter() - t0


def run_measured(cmd: list[str], result_file, peer: bool) -> dict:
    """Run one benchmark side in its own process; its JSON result plus wall time and peak
    RSS (os.wait4). ``peer``: keep qcore's environment out of the peer's interpreter."""
    import json
    import os
    import subprocess
    import time
    from pathlib import Path

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if peer:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    result = {"error": f"exit code {code}"} if code else json.loads(Path(result_file).read_text())
    result.update(wall=wall, rss_mb=usage.ru_maxrss / 1024)  # Linux reports kilobytes
    return result
