"""Architecture adapters for Llama, Qwen2 (q/k/v biases; same layout) and Qwen3 (per-head
RMSNorms on queries and keys before RoPE, no q/k/v biases)."""

from qcore.hookspecs import hookimpl
from qcore.models.adapter import LayerRoles, LlamaLikeAdapter


class LlamaAdapter(LlamaLikeAdapter):
    name = "llama"
    model_types = ("llama", "mistral")
    description = "Llama / Mistral decoders"


class Qwen2Adapter(LlamaLikeAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    description = "Qwen2 decoders (DeepSeek-R1-Distill-Qwen, QwQ)"


class Qwen3Adapter(LlamaLikeAdapter):
    name = "qwen3"
    model_types = ("qwen3",)
    description = "Qwen3 decoders (q/k RMSNorms per head)"

    def roles(self) -> LayerRoles:
        return super().roles().model_copy(update={"q_norm": "self_attn.q_norm",
                                                  "k_norm": "self_attn.k_norm"})


@hookimpl
def qcore_register_architectures(register):
    register(LlamaAdapter)
    register(Qwen2Adapter)
    register(Qwen3Adapter)
