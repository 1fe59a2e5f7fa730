"""Configuration of a PoD Llama: a Llama whose consecutive layers share the keys of distant tokens.

Shipped next to exported checkpoints as remote code: relative imports only, torch + transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .groups import GroupSpec

SHARED_KEY_INITS = ("anchor", "mean")
POD_ATTENTION_PATHS = ("sdpa", "eager", "flex")
DISTANT_POLICIES = ("shared", "shared_kv", "drop")


@strict
class PodLlamaConfig(LlamaConfig):
    r"""A :class:`~transformers.LlamaConfig` plus the PoD structure.

    Args:
        n_sink: attention-sink positions (the first ``n_sink`` tokens of a document) that every layer
            attends with its own keys.
        n_recent: recent window; a key at position ``j`` is proximal for the query at position ``i``
            when ``i - j < n_recent``. Other non-sink keys are distant.
        anchors: ``anchors[layer][kv_head]`` is the lowest layer of the block that holds ``layer``
            for that KV head; distant keys of ``layer`` come from it. ``None`` means every layer is
            its own anchor (the original model).
        shared_key_init: ``"anchor"`` (the paper: reuse the anchor's own keys, no new parameters) or
            ``"mean"`` (a shared key projection per block, initialised as the mean of the block's
            ``k_proj`` rows).
        pod_attn_implementation: ``"sdpa"`` (default, CPU and GPU), ``"eager"`` (readable reference)
            or ``"flex"`` (FlexAttention with block-sparse masks, for CUDA).
        pod_chunk_size: queries per chunk in the SDPA path (bounds the mask and score memory).
        distant_policy: ``"shared"`` (PoD: distant keys from the anchor, own values); the
            baselines that run on the same machinery: ``"shared_kv"`` (CLA-style: distant keys
            *and* values from the anchor) and ``"drop"`` (StreamingLLM-style: distant tokens are
            neither attended nor cached).
        loss_chunk_size: training only (``model.train()`` and ``labels`` given): the cross-entropy is
            computed over chunks of this many positions, each chunk's logits recomputed in backward,
            so the ``[batch, seq, vocab]`` logits never exist at once (Llama-3 at 32K: 39 GiB) and
            ``logits`` is returned as ``None``. The loss and gradients are those of the standard loss.
            ``0`` (default): the standard Hugging Face loss on full logits.
    """

    model_type = "pod_llama"

    n_sink: int = 16
    n_recent: int = 4080
    anchors: list | None = None
    shared_key_init: str = "anchor"
    pod_attn_implementation: str = "sdpa"
    pod_chunk_size: int = 512
    distant_policy: str = "shared"
    loss_chunk_size: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")
        if self.n_recent < 1:
            raise ValueError(
                f"n_recent must be >= 1 (the window holds at least the token itself), got {self.n_recent}"
            )
        if self.shared_key_init not in SHARED_KEY_INITS:
            raise ValueError(
                f"shared_key_init must be one of {SHARED_KEY_INITS}, got {self.shared_key_init!r}"
            )
        if self.pod_attn_implementation not in POD_ATTENTION_PATHS:
            raise ValueError(
                f"pod_attn_implementation must be one of {POD_ATTENTION_PATHS}, got {self.pod_attn_implementation!r}"
            )
        if self.distant_policy not in DISTANT_POLICIES:
            raise ValueError(f"distant_policy must be one of {DISTANT_POLICIES}, got {self.distant_policy!r}")
        if self.distant_policy == "shared_kv" and self.shared_key_init != "anchor":
            raise ValueError(
                "distant_policy='shared_kv' shares the anchor's own keys and values: use shared_key_init='anchor'"
            )
        if self.loss_chunk_size < 0:
            raise ValueError(
                f"loss_chunk_size must be >= 0 (0: the standard loss), got {self.loss_chunk_size}"
            )
        if self.pod_chunk_size < 1:
            raise ValueError(f"pod_chunk_size must be >= 1, got {self.pod_chunk_size}")
        if self.anchors is None:
            self.anchors = [
                list(row)
                for row in GroupSpec.identity(self.num_hidden_layers, self.num_key_value_heads).anchors
            ]
        spec = GroupSpec(tuple(tuple(row) for row in self.anchors))
        spec.check_model(self.num_hidden_layers, self.num_key_value_heads)
        self.anchors = [list(row) for row in spec.anchors]

    @property
    def group_spec(self) -> GroupSpec:
        return GroupSpec(tuple(tuple(row) for row in self.anchors))


__all__ = ["PodLlamaConfig"]
