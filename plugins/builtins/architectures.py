"""Architecture adapters for Llama and Qwen2 (Qwen2 adds q/k/v biases; same layout)."""

from qcore.hookspecs import hookimpl
from qcore.models.adapter import LlamaLikeAdapter


class LlamaAdapter(LlamaLikeAdapter):
    name = "llama"
    model_types = ("llama", "mistral")
    description = "Llama / Mistral decoders"


class Qwen2Adapter(LlamaLikeAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    description = "Qwen2 decoders (DeepSeek-R1-Distill-Qwen, QwQ)"


@hookimpl
def qcore_register_architectures(register):
    register(LlamaAdapter)
    register(Qwen2Adapter)
