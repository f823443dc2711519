"""Where a method's quantization time goes: one qcore run under a sampling profiler.

    python benchmarks/profile_method.py --method gptq --scheme W4A16 --samples 32
    python benchmarks/profile_method.py --method flatquant --scheme W4A4 --samples 8 \
        --set epochs=1
    python benchmarks/profile_method.py --method awq --samples 4 --html /tmp/awq.html

The run is bench_methods.py's qcore side (SmolLM2-135M-Instruct float32, N x 512 windows
of the head of ../shared/data/wiki_en.txt, the method's defaults unless ``--set``, 2
threads, the layer-wise pipeline ``qcore quantize`` runs) under pyinstrument (``pip
install pyinstrument``; not a dependency of qcore). It prints two tables:

* **phases**: inclusive time of qcore's own functions (core, plugins, backends), each
  counted once per sample: which step of the method costs what;
* **leaves**: self time by innermost Python frame; tensor kernels are charged to the frame
  that called them (``Linear.forward`` is the block's matmuls, ``sdpa_attention_forward``
  attention), so this says whether a phase is matmul-bound or Python overhead.

Percentages are of the quantization call (model load excluded). A profile, not a timing:
run it on a quiet machine and read the shares, not the seconds.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import _common as common

#: path fragments of qcore's own code (the repository's folders and the import names)
OWN_CODE = ("/core/", "/plugins/", "/backends/", "/qcore/", "/qcore_")
SCHEME_GROUP = 64  # SmolLM2's 576 features need groups of 64, as in bench_methods.py


def summarise(root, top: int) -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """(total seconds, [(qcore function, inclusive s)], [(leaf frame, self s)])."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()

    def label(frame) -> str:
        where = Path(frame.file_path or "?").name
        return f"{frame.function} ({where}:{frame.line_no})"

    def walk(frame, on_stack: frozenset[str]) -> None:
        name = label(frame)
        own = frame.file_path is not None and any(p in frame.file_path for p in OWN_CODE)
        if own and name not in on_stack:  # recursion counts once
            inclusive[name] += frame.time
            on_stack = on_stack | {name}
        if not frame.is_synthetic:  # "[self]" children hold the time total_self_time sums
            leaves[name] += frame.total_self_time
        for child in frame.children:
            if not child.is_synthetic_leaf:
                walk(child, on_stack)

    walk(root, frozenset())
    return root.time, inclusive.most_common(top), leaves.most_common(top)


def main() -> None:
    p = common.benchmark_parser(__doc__)
    p.add_argument("--method", required=True)
    p.add_argument("--scheme", default="W4A16")
    common.add_wiki_flags(p, samples=32, eval_windows=False)
    common.add_threads_flag(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (YAML value), repeatable")
    p.add_argument("--top", type=int, default=20, help="rows per table")
    p.add_argument("--interval", type=float, default=0.01, help="sampling interval, seconds")
    p.add_argument("--html", help="also write pyinstrument's interactive report here")
    a = p.parse_args()
    try:
        from pyinstrument import Profiler
    except ImportError as err:
        raise SystemExit("profile_method.py needs pyinstrument: pip install pyinstrument"
                         ) from err
    import yaml

    from qcore.engine.loading import smollm2_folder
    from qcore.schemes import get_scheme

    options = {}
    for item in a.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    folder = smollm2_folder()
    files, _ = common.write_wiki_windows(folder, a.seq_len, 1, [a.samples],
                                         tempfile.mkdtemp(prefix="profile_method_"))
    scheme = get_scheme(a.scheme, SCHEME_GROUP if a.scheme.endswith("A16") else None)

    profiler = Profiler(interval=a.interval)
    profiler.start()
    _, _, seconds = common.quantize_with_qcore(folder, files[a.samples], a.method, scheme, options,
                                               a.threads)
    profiler.stop()
    total, phases, leaves = summarise(profiler.last_session.root_frame(), a.top)

    print(f"{a.method} {a.scheme} {options or 'defaults'}, {a.samples} x {a.seq_len} wiki "
          f"windows, {a.threads} threads: quantization {seconds:.1f} s "
          f"(profiled process {total:.1f} s)")
    for title, rows in (("phases: qcore functions, inclusive", phases),
                        ("leaves: innermost frames, self", leaves)):
        print()
        common.print_table([title, "s", "share"],
                           [[f"`{name}`", f"{t:.1f}", f"{t / seconds:.0%}"] for name, t in rows])
    if a.html:
        Path(a.html).write_text(profiler.output_html())
        print(f"\nreport: {a.html}")


if __name__ == "__main__":
    main()
