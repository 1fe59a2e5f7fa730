"""PoD: Proximal tokens over Distant tokens — KV-cache compression by sharing distant keys across layers.

Public API (imported lazily, so ``import pod`` stays cheap)::

    from pod import PodLlamaConfig, PodLlamaForCausalLM, PodCache   # the model
    from pod import GroupSpec, kv_cache_bytes                        # group specs, cache formula
    from pod import convert_llama                                    # Llama -> PoD
    from pod import analyze_similarity, group_layers                 # choosing the blocks
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "PodLlamaConfig": "pod.configuration_pod_llama",
    "PodLlamaForCausalLM": "pod.modeling_pod_llama",
    "PodLlamaModel": "pod.modeling_pod_llama",
    "PodCache": "pod.modeling_pod_llama",
    "POD_ATTENTION_IMPLEMENTATIONS": "pod.modeling_pod_llama",
    "GroupSpec": "pod.groups",
    "GroupSpecError": "pod.groups",
    "kv_cache_bytes": "pod.groups",
    "kv_saving": "pod.groups",
    "convert_llama": "pod.convert",
    "ConversionError": "pod.convert",
    "analyze_similarity": "pod.grouping",
    "group_layers": "pod.grouping",
    "proximal_importance": "pod.grouping",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pod' has no attribute {name!r}")


def _register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load ``pod_llama`` checkpoints once pod is imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .configuration_pod_llama import PodLlamaConfig
    from .modeling_pod_llama import PodLlamaForCausalLM

    AutoConfig.register("pod_llama", PodLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(PodLlamaConfig, PodLlamaForCausalLM, exist_ok=True)


_register_auto_classes()
