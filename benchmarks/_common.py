"""The scaffold every benchmark shares, on both sides (qcore's venv and the peer's).

* flags: ``benchmark_parser``, ``add_wiki_flags``, ``add_threads_flag``,
  ``add_group_batch_flags``, ``add_skip_side_flags``,
  ``add_worker_flags`` (the hidden flags of a worker process);
* one cell per process: ``run_cell`` in the parent, ``parse_args_or_run_worker`` in the
  child, ``run_measured`` below (wall time and the child's peak RSS by os.wait4);
* memory: ``peak_rss_mb`` and ``current_rss_mb`` of this process;
* tables: ``Column`` + ``print_results`` (fixed width, a failed cell on one line) and
  ``print_table`` (markdown, or columns padded to their widest cell);
* data and models: ``WIKI``, ``write_wiki_windows``, ``smollm2_wiki_files``,
  ``load_fp32``, ``window_perplexity``;
* the two sides: ``quantize_with_qcore``, ``fp32_result`` (qcore's venv) and
  ``peer_inputs``, ``llmc_oneshot``, the ``llmc_*_scheme`` builders (llm-compressor's).

Imports nothing from qcore at import time: the peer's side runs in llm-compressor's own
environment (the parent-side helpers import qcore inside the function)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

#: the standard calibration/evaluation text (DESIGN.md), beside the project's checkout
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_en.txt"
#: llm-compressor's own venv; the worker side named PEER runs in it
PEER_PYTHON = Path("/work/llmc-venv/bin/python")
PEER = "llmc"

#: a worker: the parsed flags of its process -> its JSON-able result
Worker = Callable[[argparse.Namespace], dict]


# ----------------------------------------------------------------------------- flags
def benchmark_parser(doc: str | None, wrap_flag_help: bool = False) -> argparse.ArgumentParser:
    """A parser whose description is the script's docstring, kept as written; the flags'
    help texts are wrapped only with ``wrap_flag_help``."""
    formatter = (argparse.RawDescriptionHelpFormatter if wrap_flag_help
                 else argparse.RawTextHelpFormatter)
    return argparse.ArgumentParser(description=doc, formatter_class=formatter)


def add_wiki_flags(p: argparse.ArgumentParser, samples: int,
                   samples_help: str = "calibration windows", eval_windows: bool = True) -> None:
    """The standard wiki setting: --samples (default ``samples``), --seq-len 512 and, with
    ``eval_windows``, --eval-windows 16."""
    p.add_argument("--samples", type=int, default=samples, help=samples_help)
    p.add_argument("--seq-len", type=int, default=512)
    if eval_windows:
        p.add_argument("--eval-windows", type=int, default=16)


def add_threads_flag(p: argparse.ArgumentParser, default: int | None = 2) -> None:
    """--threads: torch threads of each side."""
    p.add_argument("--threads", type=int, default=default)


def add_group_batch_flags(p: argparse.ArgumentParser) -> None:
    """--group-size 64 (the weights' quantization group) and --batch-size 4 (qcore's
    calibration batch)."""
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="qcore calibration batch")


def add_skip_side_flags(p: argparse.ArgumentParser, skip_peer_help: str) -> None:
    """--skip-peer and --skip-qcore: leave one side of the comparison out."""
    p.add_argument("--skip-peer", action="store_true", help=skip_peer_help)
    p.add_argument("--skip-qcore", action="store_true", help="run llm-compressor only")


def add_worker_flags(p: argparse.ArgumentParser, sides: Sequence[str], *extra: str,
                     wiki_inputs: bool = True) -> None:
    """The hidden flags ``run_cell`` hands a worker process: --worker SIDE, --result, with
    ``wiki_inputs`` --calib, --eval and --model, and the ``extra`` ones (text values)."""
    p.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)
    inputs = ("--calib", "--eval", "--model") if wiki_inputs else ()
    for name in ("--result", *inputs, *extra):
        p.add_argument(name, help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- one cell per process
def cli_flags(values: Mapping[str, object]) -> list[str]:
    """``{"group_size": 64, "no_act_order": True, "qcore_set": ["a=1"]}`` as command-line
    flags ``--group-size 64 --no-act-order --qcore-set a=1``: True is the bare flag, False
    and None leave it out, a list repeats it per item, a dict is passed as JSON."""
    args: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                args += [flag, str(item)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return args


def run_cell(script: str | Path, side: str, flags: Mapping[str, object]) -> dict:
    """One cell in its own process: ``script --worker SIDE`` with ``flags`` (``cli_flags``),
    under the peer's Python for the PEER side. Its result plus wall time and peak RSS
    (``run_measured``), or an error where that Python is missing."""
    peer = side == PEER
    python = PEER_PYTHON if peer else Path(sys.executable)
    if not python.exists():
        return {"error": f"{python} missing", "wall": 0.0, "rss_mb": 0.0}
    handle, result_file = tempfile.mkstemp(prefix=f"{Path(script).stem}_{side}_",
                                           suffix=".json")
    os.close(handle)
    cmd = [str(python), str(script), "--worker", side, "--result", result_file,
           *cli_flags(flags)]
    try:
        return run_measured(cmd, result_file, peer=peer)
    finally:
        Path(result_file).unlink(missing_ok=True)


def parse_args_or_run_worker(p: argparse.ArgumentParser,
                             workers: Mapping[str, Worker]) -> argparse.Namespace:
    """The parent's parsed flags. In a worker process (``--worker SIDE``, from
    ``run_cell``): run that side's worker, write its JSON result to --result and exit."""
    a = p.parse_args()
    if a.worker:
        Path(a.result).write_text(json.dumps(workers[a.worker](a)))
        raise SystemExit(0)
    return a


def run_measured(cmd: list[str], result_file: str | Path, peer: bool) -> dict:
    """Run one benchmark side in its own process; its JSON result plus wall time and peak
    RSS (os.wait4). ``peer``: keep qcore's environment out of the peer's interpreter."""
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


# ----------------------------------------------------------------------------- memory
def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmHWM", "VmRSS") in MB; None without it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MB (VmHWM; getrusage without /proc)."""
    import resource

    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def current_rss_mb() -> float:
    """This process's resident set now, MB (VmRSS; Linux)."""
    rss = _proc_status_mb("VmRSS")
    if rss is None:
        raise OSError("VmRSS: no /proc/self/status on this system")
    return rss


# ----------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """A column of a fixed-width table: its header, its alignment and width as a format
    spec ("<30", ">8"), the result field it shows and the format of numbers there (".2f";
    text is only aligned)."""

    header: str
    width: str
    key: str
    number: str = ""

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row[self.key]
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return format(value, self.width + self.number if numeric else self.width)


def print_results(columns: Sequence[Column], rows: Iterable[Mapping[str, Any]],
                  notes: str | None = None, labels: int = 1) -> None:
    """Cell results as a fixed-width table under its header: a line per row or, where the
    cell failed, its first ``labels`` columns and ``failed: <error>``. ``notes``: a field
    shown last, two spaces after the columns, under "notes"."""
    print(" ".join(format(c.header, c.width) for c in columns) + ("  notes" if notes else ""))
    for row in rows:
        if "error" in row:
            print(" ".join(c.cell(row) for c in columns[:labels]) + f" failed: {row['error']}")
            continue
        line = " ".join(c.cell(row) for c in columns)
        print(line + (f"  {row.get(notes, '')}" if notes else ""))


def print_table(columns: Sequence[str], lines: Sequence[Sequence[str]],
                markdown: bool = True) -> None:
    """Rows of text cells under their column names: a markdown table, or (``markdown``
    False) each column padded to its widest cell."""
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max([len(c), *(len(line[i]) for line in lines)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))


# ----------------------------------------------------------------------------- data and models
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


def load_fp32(folder: str | Path):
    """A plain HF folder as a float32 causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def write_wiki_windows(folder, seq_len: int, eval_windows: int, calib_samples,
                       workdir) -> tuple[dict, Path]:
    """Token-id files of the standard wiki setting, written once in the parent so the peer
    never imports qcore: ``calib{N}.pt`` with N consecutive calibration windows of the
    head for each N in ``calib_samples``, and ``eval.pt`` with the first ``eval_windows``
    windows of the tail (tokenized at once). Returns ({N: path}, eval path).

    Parent side only: it imports qcore."""
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


@dataclass(frozen=True)
class WikiFiles:
    """What every cell of a comparison reads: the model folder and the token-id files of
    the standard wiki setting ({calibration windows: file}, evaluation file)."""

    model: Path
    calib: dict[int, Path]
    eval: Path

    @property
    def folder(self) -> Path:
        """The temporary folder holding the token files (free for other outputs)."""
        return self.eval.parent

    def worker_flags(self, samples: int) -> dict[str, object]:
        """``run_cell``'s flags for a cell calibrating on ``samples`` windows."""
        return {"calib": self.calib[samples], "eval": self.eval, "model": self.model}


def smollm2_wiki_files(a: argparse.Namespace, sizes: Iterable[int], prefix: str) -> WikiFiles:
    """SmolLM2-135M's folder and its wiki token windows (``a.seq_len`` tokens, the first
    ``a.eval_windows`` of the tail, a calibration file per size in ``sizes``) in a new
    temporary folder named ``prefix``*. Parent side: it imports qcore."""
    from qcore.engine.loading import smollm2_folder

    folder = smollm2_folder()
    calib, eval_file = write_wiki_windows(folder, a.seq_len, a.eval_windows, sizes,
                                          tempfile.mkdtemp(prefix=prefix))
    return WikiFiles(Path(folder), calib, eval_file)


# ----------------------------------------------------------------------------- qcore's side
def quantize_with_qcore(model_folder, calib_file, method: str, scheme, options: dict,
                        threads: int, batch_size: int = 4, propagation: str | None = None):
    """The qcore side of a comparison: load the float model, quantize it layer by layer on
    the CPU backend with the calibration token ids in ``calib_file`` (``propagation``: the
    run's override of the method's, like ``--propagation``). Returns (model, report,
    seconds of the quantization call). Worker side, qcore's venv only."""
    import torch

    from qcore import api
    from qcore.engine.pipeline import check_group_size, run_layerwise
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


def fp32_result(a: argparse.Namespace, batch_size: int = 4) -> dict:
    """The float model's cell: no quantization, its perplexity on --eval (--model,
    --threads)."""
    import torch

    eval_ids = torch.load(a.eval)
    torch.set_num_threads(a.threads)
    return {"seconds": 0.0, "ppl": window_perplexity(load_fp32(a.model), eval_ids, batch_size)}


# ----------------------------------------------------------------------------- the peer's side
class PeerInputs(NamedTuple):
    """What a peer worker starts from: the float model, its tokenizer, the token ids."""

    model: Any
    tokenizer: Any
    calib: Any
    eval_ids: Any


def peer_inputs(a: argparse.Namespace) -> PeerInputs:
    """The peer worker's start: --threads torch threads, the token ids of --calib and
    --eval, the float model of --model and its tokenizer. Either venv."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(a.threads)
    calib, eval_ids = torch.load(a.calib), torch.load(a.eval)
    model = load_fp32(a.model)
    return PeerInputs(model, AutoTokenizer.from_pretrained(a.model), calib, eval_ids)


def allow_pinning_without_accelerator() -> None:
    """AWQModifier pins its activation cache; pinning needs an accelerator and only speeds
    host-to-device copies, so on a CPU-only machine it becomes the identity."""
    import torch

    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def llmc_group_scheme(bits: int, group_size: int):
    """compressed-tensors' W*A16 scheme: asymmetric int weights in groups. Peer's venv."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size))


def llmc_channel_token_scheme(bits: int, symmetric_activations: bool):
    """compressed-tensors' W*A* scheme: int weights symmetric per channel, int activations
    per token, dynamic. Peer's venv."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=bits, type="int",
                                           symmetric=symmetric_activations, strategy="token",
                                           dynamic=True))


def llmc_oneshot(model, tokenizer, calib, recipe) -> float:
    """llm-compressor's ``oneshot`` over the calibration token windows ``calib`` (in
    order, all of them); its seconds. Peer side: llm-compressor's venv only."""
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
