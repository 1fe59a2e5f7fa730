"""PoD Llama: proximal tokens keep their own keys, distant tokens use keys shared across layers.

A small diff on top of ``transformers``' Llama (METHOD.md sections 1, 2 and 4):

* Every (layer, KV head) has an *anchor*: the lowest layer of its block of consecutive layers.
* For the query at position ``i`` and key at position ``j``: if ``j`` is a sink (``j < n_sink``) or
  in the recent window (``i - j < n_recent``) the layer uses its own key; otherwise (distant) the
  anchor's key. Values are never shared. One softmax runs over all keys.
* :class:`PodCache` keeps values for every position, own keys for sink and window positions, and
  distant keys once per anchor (layer, head) — that is where memory is saved.

Distant keys travel from layer to layer in a *bank*: a ``[batch, kv_heads, seq, head_dim]`` tensor
that anchor layers overwrite for the heads they anchor and later layers read. The bank is an input
and an output of each decoder layer, so gradient checkpointing recomputes it like any activation.

Shipped as remote code next to exported checkpoints: relative imports only, torch + transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers.utils import can_return_tuple

from .configuration_pod_llama import PodLlamaConfig

# ----------------------------------------------------------------------------------------- masks


@dataclass
class PodMaskInfo:
    """Positions and validity of the queries (the last ``T`` slots) and keys (all ``S`` slots).

    Built once per forward and shared by all layers. Proximity is measured in position ids, so
    left padding and packed documents (position ids restarting at 0) are handled: a document's
    sinks are its own first tokens, and keys of another document are never attended.
    """

    q_pos: torch.Tensor  # [B, T] position ids of the queries
    k_pos: torch.Tensor  # [B, S] position ids of every cached slot, queries last
    k_valid: torch.Tensor | None = None  # [B, S] False on padding; None when nothing is padded
    k_doc: torch.Tensor | None = None  # [B, S] document index; None when every row is one document
    pod_enabled: bool = True
    cache: dict = field(default_factory=dict)  # per-forward memo (e.g. flex block masks)

    @property
    def offset(self) -> int:
        """Slot of the first query."""
        return self.k_pos.shape[1] - self.q_pos.shape[1]

    @property
    def trivially_causal(self) -> bool:
        """True when the mask is plain causal attention over a fresh sequence."""
        return self.k_valid is None and self.k_doc is None and self.offset == 0


def pod_masks(
    info: PodMaskInfo, n_sink: int, n_recent: int, q0: int, q1: int, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, proximal)`` for queries ``[q0, q1)`` and key slots ``[k0, k1)``, each ``[B, q, k]``.

    ``allowed``: causal, same document, key not padding — or the query's own slot, so that a
    padding query still attends to something (its output is never used).
    ``proximal``: the key is a sink of its document or within ``n_recent`` positions of the query.
    """
    device = info.k_pos.device
    q_slot = torch.arange(q0, q1, device=device) + info.offset
    k_slot = torch.arange(k0, k1, device=device)
    causal = (k_slot[None, :] <= q_slot[:, None])[None]
    allowed = causal
    if info.k_valid is not None:
        allowed = allowed & info.k_valid[:, None, k0:k1]
    if info.k_doc is not None:
        q_doc = info.k_doc[:, info.offset + q0 : info.offset + q1]
        allowed = allowed & (q_doc[:, :, None] == info.k_doc[:, None, k0:k1])
    allowed = allowed | (k_slot[None, :] == q_slot[:, None])[None]
    q_pos = info.q_pos[:, q0:q1, None]
    k_pos = info.k_pos[:, None, k0:k1]
    proximal = (k_pos < n_sink) | (q_pos - k_pos < n_recent)
    return allowed, proximal


# ------------------------------------------------------------------------------------- attention
#
# Every path computes, for each query i and key slot j, the logit q·K_own[j] where j is proximal
# and q·K_dist[j] where j is distant, then one softmax over all j, and the output with V_own[j]
# (proximal) or V_dist[j] (distant). Inputs:
#   q [B, Hq, T, d]; k_own, k_dist, v, v_dist [B, H, S, d].
#   k_dist is k_own for a layer that anchors every head (a plain Llama layer); k_dist None drops
#   distant tokens (the StreamingLLM baseline); v_dist None means values are not shared (PoD).
# Output: [B, T, Hq, d]. k_own / v may hold anything at slots that are distant for all T queries
# (the cache no longer has them there); no path reads them there.


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def pod_eager_attention(
    q: torch.Tensor,
    k_own: torch.Tensor,
    k_dist: torch.Tensor | None,
    v: torch.Tensor,
    info: PodMaskInfo,
    *,
    n_sink: int,
    n_recent: int,
    scaling: float,
    v_dist: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """The readable reference: both score matrices, pick per (query, key), one softmax."""
    groups = q.shape[1] // k_own.shape[1]
    t, s = q.shape[2], k_own.shape[2]
    allowed, proximal = pod_masks(info, n_sink, n_recent, 0, t, 0, s)
    proximal = proximal[:, None]
    scores = q @ _repeat_kv(k_own, groups).transpose(-1, -2) * scaling
    if k_dist is None:
        allowed = allowed[:, None] & proximal
    else:
        allowed = allowed[:, None]
        scores_dist = q @ _repeat_kv(k_dist, groups).transpose(-1, -2) * scaling
        scores = torch.where(proximal, scores, scores_dist)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if v_dist is None:
        out = probs @ _repeat_kv(v, groups)
    else:
        out = (probs * proximal) @ _repeat_kv(v, groups) + (probs * ~proximal) @ _repeat_kv(v_dist, groups)
    return out.transpose(1, 2)


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float):
    """SDPA for grouped-query attention without repeating K/V: fold query groups into the length."""
    b, hq, t, d = q.shape
    h = k.shape[1]
    groups = hq // h
    if groups > 1:
        q = q.reshape(b, h, groups * t, d)
        if mask is not None:
            mask = mask[:, :, None].expand(b, 1, groups, t, mask.shape[-1]).reshape(b, 1, groups * t, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, t, d)


def _sdpa_gqa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups), is_causal=True, scale=scaling
    )


def pod_sdpa_attention(
    q: torch.Tensor,
    k_own: torch.Tensor,
    k_dist: torch.Tensor | None,
    v: torch.Tensor,
    info: PodMaskInfo,
    *,
    n_sink: int,
    n_recent: int,
    scaling: float,
    v_dist: torch.Tensor | None = None,
    chunk_size: int = 512,
    **_: object,
) -> torch.Tensor:
    """The fast path: query chunks, each one ``scaled_dot_product_attention`` call.

    For a chunk of queries, key slots that are distant for every query in the chunk get the
    distant key, the others their own key; the band of slots that is proximal for some queries and
    distant for others (at most ``chunk - 1`` slots) is appended a second time with distant keys.
    One boolean mask then selects, per query, the right copy — an exact joint softmax at the cost
    of ``chunk`` extra keys instead of doubling the key length.
    """
    t = q.shape[2]
    plain = k_dist is k_own and v_dist is None
    if plain and info.trivially_causal:
        return _sdpa_gqa_causal(q, k_own, v, scaling).transpose(1, 2)
    if plain and t == 1 and info.k_valid is None and info.k_doc is None:  # decoding: every key is visible
        return _sdpa_gqa(q, k_own, v, None, scaling).transpose(1, 2)
    outs = []
    for c0 in range(0, t, chunk_size):
        c1 = min(t, c0 + chunk_size)
        kv_end = info.offset + c1  # causal: no key after the chunk's last query
        allowed, proximal = pod_masks(info, n_sink, n_recent, c0, c1, 0, kv_end)
        keys, values = k_own[:, :, :kv_end], v[:, :, :kv_end]
        if plain:
            mask = allowed
        elif k_dist is None:
            mask = allowed & proximal
        else:
            lo = max(0, info.offset + c0 - n_recent + 1)  # slots >= lo are proximal for some query
            hi = max(lo, info.offset + c1 - n_recent)  # slots < hi are distant for some query
            use_own = (info.k_pos[:, :kv_end] < n_sink) | (torch.arange(kv_end, device=q.device) >= lo)[None]
            select = use_own[:, None, :, None]
            keys = torch.where(select, keys, k_dist[:, :, :kv_end])
            v_far = v if v_dist is None else v_dist
            if v_dist is not None:
                values = torch.where(select, values, v_dist[:, :, :kv_end])
            mask = allowed & (proximal == use_own[:, None, :])
            if hi > lo:
                keys = torch.cat([keys, k_dist[:, :, lo:hi]], dim=2)
                values = torch.cat([values, v_far[:, :, lo:hi]], dim=2)
                mask = torch.cat([mask, allowed[:, :, lo:hi] & ~proximal[:, :, lo:hi]], dim=2)
        outs.append(_sdpa_gqa(q[:, :, c0:c1], keys, values, mask[:, None], scaling))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)


_compiled_flex: Callable | None = None


def pod_flex_attention(
    q: torch.Tensor,
    k_own: torch.Tensor,
    k_dist: torch.Tensor | None,
    v: torch.Tensor,
    info: PodMaskInfo,
    *,
    n_sink: int,
    n_recent: int,
    scaling: float,
    v_dist: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """FlexAttention over ``[own keys ; distant keys]`` with a block-sparse mask (for CUDA).

    Own keys are live only near the diagonal and on the sinks, distant keys only below the
    window, so the block mask skips most of the doubled key length. Flex cannot run backward on
    CPU (torch 2.13); use ``sdpa`` there.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    b, _, t, _ = q.shape
    s = k_own.shape[2]
    mode = "plain" if (k_dist is k_own and v_dist is None) else ("drop" if k_dist is None else "two")
    key = ("flex", mode, t, s)
    if key not in info.cache:
        offset, q_pos, k_pos = info.offset, info.q_pos, info.k_pos
        k_valid, k_doc = info.k_valid, info.k_doc

        def mask_mod(bi, hi, q_idx, kv_idx):
            own = kv_idx < s
            j = torch.where(own, kv_idx, kv_idx - s)
            q_slot = q_idx + offset
            ok = j <= q_slot
            if k_valid is not None:
                ok = ok & k_valid[bi, j]
            if k_doc is not None:
                ok = ok & (k_doc[bi, j] == k_doc[bi, q_slot])
            kp = k_pos[bi, j]
            proximal = (kp < n_sink) | (q_pos[bi, q_idx] - kp < n_recent)
            chosen = {"plain": own, "drop": own & proximal, "two": proximal == own}[mode]
            return (ok & chosen) | (own & (j == q_slot))

        info.cache[key] = create_block_mask(
            mask_mod, b, None, t, 2 * s if mode == "two" else s, device=q.device, _compile=q.is_cuda
        )
    keys, values = k_own, v
    if mode == "two":
        keys = torch.cat([k_own, k_dist], dim=2)
        values = torch.cat([v, v if v_dist is None else v_dist], dim=2)
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    out = fn(
        q, keys, values, block_mask=info.cache[key], scale=scaling, enable_gqa=q.shape[1] != k_own.shape[1]
    )
    return out.transpose(1, 2)


POD_ATTENTION_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": pod_eager_attention,
    "sdpa": pod_sdpa_attention,
    "flex": pod_flex_attention,
}


# ------------------------------------------------------------------------------------------ cache


def _take_heads(x: torch.Tensor, heads: list[int], index: torch.Tensor) -> torch.Tensor:
    """``x[:, heads]``, as a view when the heads are a contiguous range."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0] : heads[0] + len(heads)]
    return x.index_select(1, index)


def _compact(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied if it is a view into a larger buffer (so the cache never pins dropped data)."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class PodCacheLayer(CacheLayerMixin):
    """One layer's cache: named ``[batch, heads, slots, head_dim]`` tensors of two kinds.

    * *full* tensors keep every slot;
    * *proximal* tensors keep only the sink slots and the last ``n_recent`` slots: a slot's entry
      is dropped once it leaves the window of the last query processed.

    What goes where is the attention layer's choice (:class:`PodLlamaAttention`); for PoD, values
    and the anchor heads' keys are full, the other heads' own keys proximal.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.full: dict[str, torch.Tensor] = {}
        self.sink: dict[str, torch.Tensor] = {}
        self.window: dict[str, torch.Tensor] = {}
        self.length = 0  # slots seen
        self.sink_len = 0  # slots held in `sink`
        self.window_start = 0  # slot of `window[...][:, :, 0]`

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "PodCache is written by PodLlamaAttention (own, shared and value states together); "
            "it cannot be used by a plain Llama layer"
        )

    def append(
        self,
        full_new: dict[str, torch.Tensor],
        prox_new: dict[str, torch.Tensor],
        num_new: int,
        sink_slots: int,
        n_recent: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor | None, torch.Tensor]], int, int]:
        """Add ``num_new`` slots. Returns, for the attention over all slots:

        ``full`` (every slot), ``prox[name] = (sink, tail)`` where ``sink`` covers slots
        ``[0, sink_len)`` and ``tail`` covers ``[tail_start, S)`` — the window before trimming, so
        the new queries still see every key of their own windows — and ``(sink_len, tail_start)``.
        """
        self.is_initialized = True
        for name, new in full_new.items():
            self.full[name] = (
                _compact(new) if name not in self.full else torch.cat([self.full[name], new], dim=2)
            )
        total = self.length + num_new
        sink_len, tail_start = self.sink_len, self.window_start
        take = 0
        if sink_len < sink_slots and tail_start == sink_len:
            take = min(sink_slots - sink_len, total - tail_start)
        kept_from = max(sink_len + take, total - n_recent)
        prox = {}
        # Slices are compacted so that dropped slots are really freed (a view would keep them).
        for name, new in prox_new.items():
            tail = new if name not in self.window else torch.cat([self.window[name], new], dim=2)
            prox[name] = (self.sink.get(name), tail)
            if take:
                head = tail[:, :, :take]
                self.sink[name] = (
                    _compact(head) if name not in self.sink else torch.cat([self.sink[name], head], 2)
                )
            self.window[name] = _compact(tail[:, :, kept_from - tail_start :])
        self.length, self.sink_len, self.window_start = total, sink_len + take, kept_from
        return self.full, prox, sink_len, tail_start

    def kept_slots(self) -> torch.Tensor:
        """Slots that proximal tensors still hold: the sinks and the window."""
        return torch.cat([torch.arange(self.sink_len), torch.arange(self.window_start, self.length)])

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _stores(self) -> tuple[dict[str, torch.Tensor], ...]:
        return self.full, self.sink, self.window

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for store in self._stores():
            for name in store:
                store[name] = fn(store[name])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def reset(self) -> None:
        for store in self._stores():
            store.clear()
        self.length = self.sink_len = self.window_start = 0

    def tensors(self) -> list[torch.Tensor]:
        return [t for store in self._stores() for t in store.values()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class PodCache(Cache):
    """The PoD KV cache: created automatically by :class:`PodLlamaForCausalLM` (``generate`` too).

    ``nbytes()`` counts the key and value tensors it holds; for an unpadded batch it equals
    ``pod.kv_cache_bytes(config, seq_len, batch_size, dtype)`` exactly. With left padding the sink
    region is widened to the longest padding so that every row keeps its own sinks.
    """

    def __init__(self, config: PodLlamaConfig):
        super().__init__(layers=[PodCacheLayer() for _ in range(config.num_hidden_layers)])
        self.n_sink = config.n_sink
        self.n_recent = config.n_recent
        self.positions: torch.Tensor | None = None  # [B, S] position ids of the cached slots
        self.sink_slots = config.n_sink
        self.packed = False  # filled from rows holding several documents: cannot be continued

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.positions is None else self.positions.shape[1]

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (position ids, a few bytes a token, not counted)."""
        return sum(layer.nbytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.positions = self.positions[indices]

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PodCache drops old own keys, so it cannot be cropped (assisted decoding)")

    def reset(self) -> None:
        super().reset()
        self.positions = None
        self.sink_slots = self.n_sink
        self.packed = False


# ----------------------------------------------------------------------------------------- layers


class PodLlamaAttention(nn.Module):
    """Llama attention whose distant keys come from the block's anchor.

    Per KV head, this layer either *anchors* its block (its keys — or in ``mean`` mode its shared
    keys — serve the whole block's distant tokens) or borrows the anchor's keys from the bank.
    ``distant_policy`` selects the baselines that share the machinery: ``shared_kv`` also
    borrows the anchor's distant *values* (CLA-style), ``drop`` attends no distant token at all
    (StreamingLLM-style).
    """

    def __init__(self, config: PodLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

        row = config.anchors[layer_idx]
        self.policy = config.distant_policy
        self.mean_mode = config.shared_key_init == "mean"
        heads = list(range(self.num_kv_heads))
        self.anchor_heads = [h for h in heads if row[h] == layer_idx]
        self.borrow_heads = [h for h in heads if row[h] != layer_idx]
        if self.policy == "drop":
            self.anchor_heads, self.borrow_heads = [], []
        # Heads whose own keys the cache keeps for proximal slots only.
        self.own_heads = heads if (self.mean_mode or self.policy == "drop") else self.borrow_heads
        # A layer that anchors every head with its own keys and values is exactly a Llama layer.
        self.plain = self.policy != "drop" and not self.mean_mode and not self.borrow_heads
        if self.mean_mode and self.anchor_heads:
            self.shared_k_proj = nn.Linear(hidden, len(self.anchor_heads) * self.head_dim, bias=bias)
        order = self.own_heads + (self.anchor_heads if self.own_heads != heads else [])
        self._head_lists = {
            "anchor": self.anchor_heads,
            "own": self.own_heads,
            "merge": [order.index(h) for h in heads],  # [own ; anchor] -> head order
        }
        self._index_memo: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _index(self, name: str, device: torch.device) -> torch.Tensor:
        """Head indices as a tensor on ``device`` (made once; plain attributes, not buffers, so that
        meta-device loading leaves nothing uninitialised)."""
        key = (name, device)
        if key not in self._index_memo:
            self._index_memo[key] = torch.tensor(self._head_lists[name], dtype=torch.long, device=device)
        return self._index_memo[key]

    def _heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return _take_heads(x, self._head_lists[name], self._index(name, x.device))

    def _into_bank(self, bank: torch.Tensor | None, anchored: torch.Tensor) -> torch.Tensor:
        if len(self.anchor_heads) == self.num_kv_heads:
            return anchored
        return bank.index_copy(1, self._index("anchor", bank.device), anchored)

    def _all_slots(
        self,
        parts: tuple[torch.Tensor | None, torch.Tensor],
        sink_len: int,
        tail_start: int,
        fill_end: int,
        bank: torch.Tensor | None,
        anchored: torch.Tensor | None,
    ) -> torch.Tensor:
        """States of every slot from the cache's pieces: own sinks, then the bank's (distant)
        states for slots ``[sink_len, fill_end)`` — distant for every new query, whether or not the
        cache still has their own states — then own states of the window and the new slots; the
        anchor heads' full states are merged back in head order."""
        sink, tail = parts
        pieces = [] if sink is None else [sink]
        if fill_end > sink_len:
            pieces.append(self._heads(bank, "own")[:, :, sink_len:fill_end])
        pieces.append(tail[:, :, fill_end - tail_start :])
        states = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        if anchored is not None and len(self.own_heads) != self.num_kv_heads:
            states = torch.cat([states, anchored], dim=1).index_select(1, self._index("merge", states.device))
        return states

    def forward(
        self,
        hidden_states: torch.Tensor,
        bank_k: torch.Tensor | None,
        bank_v: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        info: PodMaskInfo,
        past_key_values: PodCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        share_values = self.policy == "shared_kv"

        # What serves the block's distant tokens: the anchor's own keys, or its shared keys.
        anchor_k = anchor_v = None
        if self.anchor_heads:
            if self.mean_mode:
                shared = self.shared_k_proj(hidden_states).view(shape).transpose(1, 2)
                anchor_k = apply_rotary_pos_emb(shared, shared, cos, sin)[1]
            else:
                anchor_k = k if self.plain else self._heads(k, "anchor")
            if share_values:
                anchor_v = v if self.plain else self._heads(v, "anchor")

        own_k, own_v = k, v
        if past_key_values is not None:
            if not info.pod_enabled:
                raise RuntimeError(
                    "pod_disabled() computes the dense model and cannot use a PodCache: pass use_cache=False"
                )
            full_new, prox_new = {}, {}
            if anchor_k is not None:
                full_new["k"] = anchor_k
            if share_values or self.policy == "drop":
                if anchor_v is not None:
                    full_new["v"] = anchor_v
                if self.own_heads:
                    prox_new["v"] = self._heads(v, "own")
            else:
                full_new["v"] = v
            if self.own_heads:
                prox_new["k"] = self._heads(k, "own")
            full, prox, sink_len, tail_start = past_key_values.layers[self.layer_idx].append(
                full_new, prox_new, t, past_key_values.sink_slots, past_key_values.n_recent
            )
            anchor_k = full.get("k")
            if share_values:
                anchor_v = full.get("v")

        if anchor_k is not None:
            bank_k = self._into_bank(bank_k, anchor_k)
        if anchor_v is not None and share_values:
            bank_v = self._into_bank(bank_v, anchor_v)

        # One key per slot already: a single unpadded query (decoding) gets, from the cache, own
        # states exactly where they are proximal and the anchor's elsewhere, so the attention
        # needs no second key version.
        preselected = False
        if past_key_values is not None:
            if self.policy == "drop":  # the compact layout: kept slots only (see PodMaskInfo)
                own_k, own_v = (torch.cat([p for p in prox[n] if p is not None], dim=2) for n in ("k", "v"))
            else:
                # Slots before the first new query's window are distant for all new queries.
                fill_end = max(tail_start, info.offset - self.config.n_recent + 1)
                slots = (sink_len, tail_start, fill_end)
                own_k = (
                    anchor_k if not self.own_heads else self._all_slots(prox["k"], *slots, bank_k, anchor_k)
                )
                if share_values:
                    own_v = (
                        anchor_v
                        if not self.own_heads
                        else self._all_slots(prox["v"], *slots, bank_v, anchor_v)
                    )
                else:
                    own_v = full["v"]
                preselected = t == 1 and info.k_valid is None

        if self.plain or not info.pod_enabled or preselected:
            k_dist, v_dist = own_k, None
        elif self.policy == "drop":
            k_dist, v_dist = None, None
        else:
            k_dist, v_dist = bank_k, (bank_v if share_values else None)
        attention = POD_ATTENTION_IMPLEMENTATIONS[self.config.pod_attn_implementation]
        out = attention(
            q,
            own_k,
            k_dist,
            own_v,
            info,
            v_dist=v_dist,
            n_sink=self.config.n_sink,
            n_recent=self.config.n_recent,
            scaling=self.scaling,
            chunk_size=self.config.pod_chunk_size,
        )
        out = self.o_proj(out.reshape(b, t, -1).contiguous())
        return out, bank_k, bank_v


class PodLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PodLlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PodLlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        bank_k: torch.Tensor | None,
        bank_v: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        info: PodMaskInfo | None = None,
        past_key_values: PodCache | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # The banks are positional so that checkpointing propagates their gradients to the anchors.
        attn_out, bank_k, bank_v = self.self_attn(
            self.input_layernorm(hidden_states), bank_k, bank_v, position_embeddings, info, past_key_values
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, bank_k, bank_v


# ----------------------------------------------------------------------------------------- models


class PodLlamaPreTrainedModel(LlamaPreTrainedModel):
    config: PodLlamaConfig
    config_class = PodLlamaConfig
    _no_split_modules = ["PodLlamaDecoderLayer"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False
    _can_record_outputs = {}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The model builds its own PodCache; a DynamicCache would keep every key.
        return False


class PodLlamaModel(PodLlamaPreTrainedModel):
    def __init__(self, config: PodLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PodLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.pod_enabled = True
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PodCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (self.gradient_checkpointing and self.training) or not self.pod_enabled:
            use_cache = False
            past_key_values = None
        if use_cache and past_key_values is None:
            past_key_values = PodCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, PodCache):
            raise TypeError(
                f"PodLlamaModel needs a PodCache, got {type(past_key_values).__name__}: "
                "pass past_key_values=None and the model creates one"
            )
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0

        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + length, device=device)[None]
        position_ids = position_ids.to(device).expand(batch, length)
        k_pos = position_ids if past_len == 0 else torch.cat([past_key_values.positions, position_ids], dim=1)
        kept = None
        if past_key_values is not None and past_len and self.config.distant_policy == "drop":
            # Nothing distant is cached: attention runs over the kept slots only.
            kept = torch.cat(
                [past_key_values.layers[0].kept_slots(), torch.arange(past_len, past_len + length)]
            )
        info = self._mask_info(position_ids, k_pos, attention_mask, kept)
        if past_key_values is not None:
            if past_key_values.packed:
                raise ValueError(
                    "this PodCache was filled from packed rows (several documents per row); it keeps "
                    "only the first document's sinks, so generation cannot continue from it. Continue "
                    "one document per row, or score packed rows with use_cache=False"
                )
            starts = info.k_pos == 0
            if info.k_valid is not None:
                starts = starts & info.k_valid
            past_key_values.packed = bool((starts.sum(1) > 1).any())
            if past_len == 0 and info.k_valid is not None:
                # Left padding: widen the sink region so every row keeps its own sinks.
                leading_pad = (info.k_valid.long().cumsum(1) == 0).sum(1).max().item()
                past_key_values.sink_slots = self.config.n_sink + int(leading_pad)
            past_key_values.positions = k_pos

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        bank_k = bank_v = None
        for layer in self.layers:
            hidden_states, bank_k, bank_v = layer(
                hidden_states,
                bank_k,
                bank_v,
                position_embeddings=position_embeddings,
                info=info,
                past_key_values=past_key_values,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _mask_info(
        self,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kept: torch.Tensor | None = None,
    ) -> PodMaskInfo:
        k_valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != k_pos.shape[1]:
                raise ValueError(
                    f"attention_mask must be [batch, past + new tokens] = [{k_pos.shape[0]}, {k_pos.shape[1]}], "
                    f"got {list(attention_mask.shape)}"
                )
            k_valid = attention_mask.to(torch.bool)
        if kept is not None:
            kept = kept.to(k_pos.device)
            k_pos = k_pos[:, kept]
            k_valid = None if k_valid is None else k_valid[:, kept]
        if k_valid is not None:
            if bool(k_valid.all()):
                k_valid = None
        # A document starts where the position id is 0 (packed sequences restart their positions).
        k_doc = (k_pos == 0).long().cumsum(1)
        if not bool((k_doc != k_doc[:, -1:]).any()):
            k_doc = None
        return PodMaskInfo(
            q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, k_doc=k_doc, pod_enabled=self.pod_enabled
        )


class PodLlamaForCausalLM(PodLlamaPreTrainedModel, GenerationMixin):
    """A Llama causal LM with PoD attention and cache. Weights are named as in Llama."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PodLlamaConfig):
        super().__init__(config)
        self.model = PodLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @contextmanager
    def pod_disabled(self):
        """Compute as the dense original inside this block (every layer uses its own keys).

        In ``anchor`` mode this is exactly the source Llama; used as the teacher of
        self-distillation. The cache is off inside the block.
        """
        previous = self.model.pod_enabled
        self.model.pod_enabled = False
        try:
            yield self
        finally:
            self.model.pod_enabled = previous

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PodCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        chunk = getattr(self.config, "loss_chunk_size", 0)
        if chunk and labels is not None and self.training and isinstance(logits_to_keep, int):
            loss = self._chunked_loss(hidden_states, labels, chunk, **kwargs)
            return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    def _chunked_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        chunk: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        """The causal-LM loss of ``transformers``' ``ForCausalLMLoss``, ``chunk`` positions at a time.

        Each chunk's logits are made inside a checkpoint, so backward recomputes them instead of
        keeping them: at most one chunk of logits (and its fp32 copy) is alive.
        """
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        shift_labels = shift_labels.to(hidden_states.device)

        def chunk_sum(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            logits = self.lm_head(hidden).float()
            return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")

        total = hidden_states.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden_states.shape[1], chunk):
            part = (hidden_states[:, start : start + chunk], shift_labels[:, start : start + chunk])
            total = total + torch.utils.checkpoint.checkpoint(chunk_sum, *part, use_reentrant=False)
        if num_items_in_batch is None:
            return total / (shift_labels != -100).sum()  # the mean, as the standard loss takes it
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


PodLlamaConfig.register_for_auto_class()
PodLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "POD_ATTENTION_IMPLEMENTATIONS",
    "PodCache",
    "PodLlamaForCausalLM",
    "PodLlamaModel",
    "PodLlamaPreTrainedModel",
    "PodMaskInfo",
    "pod_eager_attention",
    "pod_flex_attention",
    "pod_sdpa_attention",
]
