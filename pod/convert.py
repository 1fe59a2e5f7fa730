"""Convert a pretrained Llama into a PoD Llama: same weights, distant keys shared per block."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaForCausalLM, PreTrainedModel

from .configuration_pod_llama import SHARED_KEY_INITS, PodLlamaConfig
from .groups import GroupSpec, GroupSpecError
from .modeling_pod_llama import PodLlamaForCausalLM

__all__ = ["ConversionError", "convert_llama", "load_llama"]

_LLAMA_TYPES = ("llama",)


class ConversionError(ValueError):
    """The model, the group spec or the PoD settings cannot be combined."""


def load_llama(model_or_path: str | Path, dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """Load a Llama causal LM from a local folder (or a Hub name when online), checking the type first."""
    path = str(model_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        if os.path.isdir(path):
            raise ConversionError(f"{path}: not a model folder (no readable config.json): {err}") from err
        raise ConversionError(
            f"model path not found: {path!r} is not a local folder, and as a Hub model name it could not be "
            f"loaded (offline? set the path to a local checkpoint): {type(err).__name__}"
        ) from err
    if config.model_type not in _LLAMA_TYPES:
        raise ConversionError(
            f"{path}: model_type is {config.model_type!r}; PoD converts Llama-architecture models (model_type 'llama')"
        )
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype or "auto")


def _as_group_spec(groups: GroupSpec | str | Path | list) -> GroupSpec:
    if isinstance(groups, GroupSpec):
        return groups
    if isinstance(groups, (str, Path)):
        return GroupSpec.load(groups)
    return GroupSpec(tuple(tuple(row) for row in groups))


def convert_llama(
    model_or_path: PreTrainedModel | str | Path,
    groups: GroupSpec | str | Path | list,
    *,
    n_sink: int,
    n_recent: int,
    shared_key_init: str = "anchor",
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    chunk_size: int | None = None,
    distant_policy: str = "shared",
) -> PodLlamaForCausalLM:
    """Turn a Llama into a :class:`PodLlamaForCausalLM` with the same weights.

    Args:
        model_or_path: a ``LlamaForCausalLM`` or a local checkpoint folder / Hub name.
        groups: a :class:`GroupSpec`, a path to its JSON, or the nested anchors list.
        n_sink, n_recent: the proximal region (METHOD.md section 1).
        shared_key_init: ``"anchor"`` (reuse the anchor's keys; no new parameters) or ``"mean"``
            (a shared key projection per block, initialised as the mean of its layers' ``k_proj``).
        dtype: dtype of the result (default: the source's).
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flex"``.
        chunk_size: query chunk of the SDPA path (default: the config's).
        distant_policy: ``"shared"`` (PoD) or a baseline on the same machinery: ``"shared_kv"``
            (CLA-style, distant values shared too) or ``"drop"`` (StreamingLLM-style).

    Raises:
        ConversionError: not a Llama, a group spec that does not fit, or invalid PoD settings.
    """
    if n_sink < 0:
        raise ConversionError(f"n_sink must be >= 0, got {n_sink}")
    if n_recent < 1:
        raise ConversionError(
            f"n_recent must be >= 1 (the window holds at least the token itself), got {n_recent}"
        )
    if shared_key_init not in SHARED_KEY_INITS:
        raise ConversionError(f"shared_key_init must be one of {SHARED_KEY_INITS}, got {shared_key_init!r}")

    source = model_or_path if isinstance(model_or_path, PreTrainedModel) else load_llama(model_or_path, dtype)
    if getattr(source.config, "model_type", None) not in _LLAMA_TYPES or not hasattr(source, "model"):
        raise ConversionError(
            f"{type(source).__name__} (model_type {getattr(source.config, 'model_type', None)!r}) is not a "
            "Llama causal LM; PoD converts LlamaForCausalLM models"
        )
    src_cfg = source.config
    try:
        spec = _as_group_spec(groups)
        spec.check_model(src_cfg.num_hidden_layers, src_cfg.num_key_value_heads)
    except GroupSpecError as err:
        raise ConversionError(f"group spec does not fit the model: {err}") from err

    fields = src_cfg.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        fields.pop(key, None)
    fields.update(
        n_sink=n_sink,
        n_recent=n_recent,
        anchors=[list(row) for row in spec.anchors],
        shared_key_init=shared_key_init,
        pod_attn_implementation=attn_implementation,
        distant_policy=distant_policy,
    )
    if chunk_size is not None:
        fields["pod_chunk_size"] = chunk_size
    try:
        config = PodLlamaConfig(
            **{k: v for k, v in fields.items() if k in PodLlamaConfig.__dataclass_fields__}
        )
    except ValueError as err:
        raise ConversionError(str(err)) from err

    source_dtype = next(source.parameters()).dtype
    with torch.device("meta"):
        model = PodLlamaForCausalLM(config)
    state = source.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if ".shared_k_proj." not in k]
    if missing or unexpected:
        raise ConversionError(
            f"weights do not match a Llama: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if shared_key_init == "mean":
        _init_mean_shared_keys(model, spec)
    # Buffers made on the meta device (rotary frequencies) are rebuilt on the weights' device.
    device = next(source.parameters()).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype or source_dtype)
    model.generation_config = source.generation_config
    return model.eval()


@torch.no_grad()
def _init_mean_shared_keys(model: PodLlamaForCausalLM, spec: GroupSpec) -> None:
    """Each block's shared key projection for head h = mean of the block's k_proj rows for h."""
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    for layer_idx, layer in enumerate(layers):
        attn = layer.self_attn
        if not attn.anchor_heads:
            continue
        ref = attn.k_proj.weight
        weight = torch.empty(
            len(attn.anchor_heads) * head_dim, ref.shape[1], dtype=ref.dtype, device=ref.device
        )
        bias = None
        if attn.k_proj.bias is not None:
            bias = torch.empty(weight.shape[0], dtype=ref.dtype, device=ref.device)
        for slot, head in enumerate(attn.anchor_heads):
            block = next((a, b) for a, b in spec.blocks(head) if a == layer_idx)
            rows = slice(head * head_dim, (head + 1) * head_dim)
            out = slice(slot * head_dim, (slot + 1) * head_dim)
            weight[out] = torch.stack([layers[m].self_attn.k_proj.weight[rows] for m in range(*block)]).mean(
                0
            )
            if bias is not None:
                bias[out] = torch.stack([layers[m].self_attn.k_proj.bias[rows] for m in range(*block)]).mean(
                    0
                )
        attn.shared_k_proj.weight = torch.nn.Parameter(weight)
        if bias is not None:
            attn.shared_k_proj.bias = torch.nn.Parameter(bias)
