"""Measure the activation memory of one Llama-3.1-8B decoder layer (dense and PoD) per token.

Counts the bytes that autograd saves for backward (``saved_tensors_hooks``) in a forward pass of
real 8B-shaped decoder layers on the CPU, parameters excluded, then extrapolates to 128K tokens
with activation checkpointing (docs/scaleout.md, "Long context at scale"). Runs in fp32 (bf16 is
~20x slower on CPU) and reports bf16 bytes: every saved floating tensor is an activation in the
model's dtype, so halving fp32 bytes gives bf16 (up to the tiny fp32 softmax statistics).

    python scripts/slurm/activation_memory.py [--tokens 1024 2048] [--chunk 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pod

GIB = 2**30


def llama_8b_config(layers: int, vocab: int) -> LlamaConfig:
    """Llama-3.1-8B's shapes (hidden 4096, MLP 14336, 32 query / 8 KV heads of 128), few layers."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )


def saved_bytes_per_layer(
    model: torch.nn.Module, layers: list[torch.nn.Module], ids: torch.Tensor
) -> list[dict]:
    """Bytes saved for backward while each decoder layer runs, split into floating / other tensors."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    seen: set[int] = set()
    stats = [{"float": 0, "other": 0} for _ in layers]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if current[0] is not None and ptr not in params and ptr not in seen:
            seen.add(ptr)
            kind = "float" if t.is_floating_point() else "other"
            stats[current[0]][kind] += storage.nbytes()
        return t

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--chunk", type=int, default=256, help="PoD SDPA query chunk (pod_chunk_size)")
    args = parser.parse_args()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(llama_8b_config(layers=2, vocab=256)).float()
    llama.train()
    # Layer 1 shares layer 0's distant keys (one block of two layers, every KV head).
    spec = pod.GroupSpec.fixed(num_layers=2, num_kv_heads=8, block_size=2)
    print(f"{'model':<28}{'tokens':>8}{'layer':>7}{'bf16 KiB/token':>16}{'non-float KiB/token':>21}{'s':>7}")
    for tokens in args.tokens:
        ids = torch.randint(0, 256, (1, tokens))
        for name, n_recent in (("dense Llama", None), (f"PoD sdpa (chunk {args.chunk})", tokens // 4)):
            if n_recent is None:
                model, layers = llama, list(llama.model.layers)
            else:
                model = pod.convert_llama(llama, spec, n_sink=16, n_recent=n_recent, chunk_size=args.chunk)
                model.train()
                layers = list(model.model.layers)
            t0 = time.perf_counter()
            stats = saved_bytes_per_layer(model, layers, ids)
            seconds = time.perf_counter() - t0
            for i, s in enumerate(stats):
                per_token_bf16 = s["float"] / 2 / tokens / 1024
                print(
                    f"{name:<28}{tokens:>8}{i:>7}{per_token_bf16:>16.1f}{s['other'] / tokens / 1024:>21.1f}{seconds:>7.1f}"
                )


if __name__ == "__main__":
    main()
