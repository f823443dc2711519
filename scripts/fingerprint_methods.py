"""Fingerprint every method on tiny random models: per-layer relative MSE and a SHA-256 of
the quantized state dict, as JSON. Run it on two commits to prove a refactor kept every
method's numbers bit-identical (same machine, same torch):

    python scripts/fingerprint_methods.py > after.json
    git stash && python scripts/fingerprint_methods.py > before.json && git stash pop
    diff before.json after.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import make_tiny_model  # noqa: E402

from qcore import api  # noqa: E402
from qcore.engine.pipeline import run_layerwise  # noqa: E402
from qcore.plugins import PluginManager  # noqa: E402
from qcore.schemes import get_scheme  # noqa: E402

CASES = [
    ("rtn", "W4A16", {}),
    ("gptq", "W4A16", {}),
    ("gptq", "W4A16", {"act_order": True, "static_groups": True}),
    ("awq", "W4A16", {"n_grid": 4}),
    ("smoothquant", "W8A8", {}),
    ("smoothquant", "W8A8KV8", {}),
    ("smoothquant", "W8A8", {"activation_mode": "static"}),
    ("smoothquant", "W8A8", {"weight_method": "gptq", "weight_options": {"mse_clip": True}}),
    ("flatquant", "W4A4", {"epochs": 1}),
    ("flatquant", "W4A4KV4", {"epochs": 1}),
    ("flatquant", "W4A4", {"epochs": 0, "weight_method": "gptq",
                           "weight_options": {"act_order": True, "static_groups": True}}),
]


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def main() -> None:
    torch.set_num_threads(1)
    plugins = PluginManager()
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    out = {}
    for kind in ("llama", "qwen2"):
        for method, scheme_name, options in CASES:
            model = make_tiny_model(kind)
            scheme = get_scheme(scheme_name, 16 if scheme_name == "W4A16" else None)
            quantizer = api.build_quantizer(method, scheme, options, plugins)
            report = run_layerwise(model, quantizer, api.adapter_for(model, plugins),
                                   api.build_backend("cpu", plugins), calib, plugins=plugins,
                                   progress=False, batch_size=2)
            key = f"{kind} {method} {scheme_name} {json.dumps(options, sort_keys=True)}"
            out[key] = {"relative_mse": [r.relative_mse for r in report.layers],
                        "state_sha256": fingerprint(model)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
