"""One FlatQuant training step of a real SmolLM2-135M decoder layer, timed and profiled.

    python benchmarks/profile_flatquant_step.py                      # fuse off, then on
    python benchmarks/profile_flatquant_step.py --fuse on --steps 20 --top 15

The step is the one ``FlatQuantQuantizer.train`` runs (training wrappers of every linear,
fake-quantized forward, MSE to the float layer's output, backward, AdamW), on a middle
decoder layer of SmolLM2-135M-Instruct float32 with ``--batch`` x ``--seq-len`` tokens of
the wiki head as input (embeddings through the float layers before it, as in the
pipeline). For each ``fuse`` setting it prints the mean step time (after warm-up steps, so
torch.compile's one-off compilation is excluded and reported apart) and a torch.profiler
table of the operators with the most self CPU time: matmuls (``aten::mm``, ``bmm``,
``addmm``) against everything else tells how far a step is from its matmul floor; last,
the rate of the step's largest product in float32 and bfloat16. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _common as common

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_scaled_dot_product",
           "aten::_flash_attention", "aten::linear")


def layer_inputs(model, ids, index: int):
    """(hidden states entering layer ``index``, its forward kwargs), float layers before."""
    import torch

    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        kwargs = {"position_embeddings": model.model.rotary_emb(hidden, positions),
                  "attention_mask": None, "position_ids": positions}
        for layer in model.model.layers[:index]:
            hidden = layer(hidden, **kwargs)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden, kwargs


def run_steps(model, hidden, kwargs, fuse: bool, a: argparse.Namespace) -> dict:
    """Time and profile FlatQuant steps of decoder layer --layer at one ``fuse`` setting:
    first step, mean of --steps after --warmup, the --top operators by self CPU time."""
    import torch
    import torch.nn.functional as F

    from qcore.models.adapter import LlamaLikeAdapter as A
    from qcore.schemes import get_scheme
    from qcore_flatquant.config import FlatQuantConfig
    from qcore_flatquant.learnables import LayerTransforms
    from qcore_flatquant.training import training_layer

    layer = model.model.layers[a.layer]
    with torch.no_grad():
        target = layer(hidden, **kwargs)
        target = target[0] if isinstance(target, tuple) else target
    c = model.config
    roles = {"q": A.Q, "k": A.K, "v": A.V, "o": A.O, "gate": A.GATE, "up": A.UP,
             "down": A.DOWN}
    config = FlatQuantConfig(fuse=fuse)
    owner = LayerTransforms(layer, roles, c.num_attention_heads,
                            c.hidden_size // c.num_attention_heads, c.num_key_value_heads,
                            config, False, torch.Generator().manual_seed(0))
    for p in layer.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(owner.parameters(), lr=config.lr)
    scheme = get_scheme(a.scheme)

    def step() -> None:
        out = layer(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        (loss / loss.detach()).backward()
        opt.step()

    with training_layer(layer, owner, A.ATTN, scheme), torch.enable_grad():
        t0 = time.perf_counter()
        step()  # the first step compiles (fuse on)
        first = time.perf_counter() - t0
        for _ in range(a.warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step()
        mean = (time.perf_counter() - t0) / a.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMULS))
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:a.top]
    return {"first": first, "mean": mean, "matmul_share": matmul / max(total, 1),
            "rows": [(e.key, e.self_cpu_time_total / 3e3, e.count // 3,
                      e.self_cpu_time_total / max(total, 1)) for e in rows]}


def matmul_rates(tokens: int, k: int, n: int, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one (tokens x k) @ (k x n) product per dtype: whether a lower training
    precision could help on this CPU."""
    import torch

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        rates[str(dtype).removeprefix("torch.")] = \
            2 * tokens * k * n * repeats / (time.perf_counter() - t0) / 1e9
    return rates


def main() -> None:
    p = common.benchmark_parser(__doc__)
    p.add_argument("--fuse", choices=["off", "on", "both"], default="both")
    p.add_argument("--scheme", default="W4A4")
    p.add_argument("--layer", type=int, default=15, help="decoder layer index")
    p.add_argument("--batch", type=int, default=4, help="windows per step (the default recipe)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    common.add_threads_flag(p)
    p.add_argument("--top", type=int, default=12, help="operators per table")
    a = p.parse_args()

    import torch

    from qcore.engine.loading import smollm2_folder

    torch.set_num_threads(a.threads)
    folder = smollm2_folder()
    files, _ = common.write_wiki_windows(folder, a.seq_len, 1, [a.batch],
                                         tempfile.mkdtemp(prefix="profile_flatquant_step_"))
    ids = torch.load(files[a.batch])
    model = common.load_fp32(str(folder))
    hidden, kwargs = layer_inputs(model, ids, a.layer)
    settings = {"off": [False], "on": [True], "both": [False, True]}[a.fuse]
    results = {}
    for fuse in settings:
        r = run_steps(model, hidden, kwargs, fuse, a)
        results[fuse] = r
        print(f"\nfuse={'on' if fuse else 'off'}: {a.scheme}, layer {a.layer}, {a.batch} x "
              f"{a.seq_len} tokens, {a.threads} threads: {r['mean']:.3f} s/step over "
              f"{a.steps} steps (first step {r['first']:.1f} s); matmuls "
              f"{r['matmul_share']:.0%} of operator self time")
        common.print_table(["operator", "ms/step", "calls/step", "share"],
                           [[f"`{key}`", f"{ms:.1f}", str(count), f"{share:.0%}"]
                            for key, ms, count, share in r["rows"]])
    c = model.config
    rates = matmul_rates(a.batch * a.seq_len, c.hidden_size, c.intermediate_size)
    print(f"\none {a.batch * a.seq_len} x {c.hidden_size} @ {c.hidden_size} x "
          f"{c.intermediate_size} product: " + ", ".join(
              f"{dtype} {rate:.0f} GFLOP/s" for dtype, rate in rates.items()))
    if len(results) == 2:
        print(f"\nfused/eager step time: {results[True]['mean'] / results[False]['mean']:.2f}")


if __name__ == "__main__":
    main()
