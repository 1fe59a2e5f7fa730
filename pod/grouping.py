"""Choosing the blocks: inter-layer attention similarity, layer grouping, proximal importance.

This is the offline stage of METHOD.md section 3, run once per pretrained Llama:

1. :func:`analyze_similarity` runs calibration sequences through the model and compares, per KV
   head, every pair of layers by how they spread the attention of the last ``n_queries`` queries
   over the *distant* keys (``1 - JS``, log base 2).
2. :func:`group_layers` turns the similarity into a :class:`~pod.groups.GroupSpec` (greedy, fixed
   block size, or a target KV saving).
3. :func:`proximal_importance` measures how often attending only to the ``n`` proximal tokens gives
   the same greedy next token as full attention (the observation behind PoD).

``python -m pod.grouping --model DIR --data FILE --out OUT`` runs all three and writes the group spec,
the similarity and the plots (see ``docs/grouping.md``).

Nothing here materialises a ``T x T`` attention matrix: the model runs with a registered attention
function that records the post-RoPE queries of the last ``n_queries`` positions and the keys of the
distant positions, then hands over to the ordinary SDPA function.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .groups import GroupSpec, kv_saving

__all__ = [
    "STRATEGIES",
    "CalibrationError",
    "GroupingError",
    "ProximalImportance",
    "SimilarityResult",
    "UnreachableSavingError",
    "UnsupportedModelError",
    "analyze_similarity",
    "group_layers",
    "main",
    "max_kv_saving",
    "proximal_importance",
    "proximal_logits",
    "retained_similarity",
    "search_delta",
]

STRATEGIES = ("greedy", "fixed", "target")

# Names under which the two attention functions are registered with transformers' AttentionInterface.
_CAPTURE_ATTENTION = "pod_grouping_capture"
_PROXIMAL_ATTENTION = "pod_grouping_proximal"


class GroupingError(ValueError):
    """Bad input to the grouping stage (a parameter, a file, a similarity array)."""


class CalibrationError(GroupingError):
    """Calibration sequences that cannot give what was asked (too short, none at all)."""


class UnsupportedModelError(GroupingError):
    """A model this stage cannot analyse (not a Llama-architecture causal LM)."""


class UnreachableSavingError(GroupingError):
    """A KV-saving target above what one block per KV head reaches."""


# ------------------------------------------------------------------------------------------ results


@dataclass
class SimilarityResult:
    """Inter-layer attention similarity of one model on calibration data.

    ``similarity[h, l, m]`` is ``1 - JS(P_l || P_m)`` (log base 2, so in ``[0, 1]``) for KV head ``h``,
    averaged over the last ``n_queries`` queries of ``num_sequences`` sequences; ``seq_len`` is the
    length of the shortest calibration sequence.
    """

    similarity: np.ndarray
    n_sink: int
    n_recent: int
    n_queries: int
    seq_len: int
    num_sequences: int
    model: str = ""

    def __post_init__(self) -> None:
        self.similarity = _similarity_array(self.similarity)

    @property
    def num_kv_heads(self) -> int:
        return self.similarity.shape[0]

    @property
    def num_layers(self) -> int:
        return self.similarity.shape[1]

    def mean(self) -> np.ndarray:
        """Similarity averaged over KV heads, ``[L, L]``."""
        return self.similarity.mean(axis=0)

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` file (the exact path given; numpy would otherwise append ``.npz``)."""
        meta = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "similarity"}
        with open(path, "wb") as handle:
            np.savez(handle, similarity=self.similarity, meta=np.array(json.dumps(meta)))

    @classmethod
    def load(cls, path: str | Path) -> SimilarityResult:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"similarity file not found: {path}")
        with np.load(path, allow_pickle=False) as data:
            if "similarity" not in data or "meta" not in data:
                raise GroupingError(f"{path}: not a similarity file (needs 'similarity' and 'meta' arrays)")
            return cls(similarity=data["similarity"], **json.loads(str(data["meta"])))


@dataclass
class ProximalImportance:
    """How often the ``n`` proximal tokens alone give the same greedy next token as full attention.

    ``agreement[k]`` is the fraction of the last ``n_queries`` positions of ``num_sequences``
    sequences whose argmax next token with only ``sizes[k]`` proximal tokens (``n_sink`` sinks plus
    the ``sizes[k] - n_sink`` most recent tokens) equals the argmax with full attention.
    """

    sizes: list[int]
    agreement: list[float]
    n_sink: int
    n_queries: int
    seq_len: int
    num_sequences: int
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ProximalImportance:
        return cls(**json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------ checks


def _check_model(model: Any) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "llama":
        raise UnsupportedModelError(
            f"expected a Llama-architecture causal LM (config.model_type 'llama'), got model_type "
            f"{model_type!r}; analyse the original Llama before converting it to PoD"
        )
    if not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot switch its attention function (no set_attn_implementation); "
            "pass a transformers LlamaForCausalLM"
        )


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise GroupingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_sequences(sequences: torch.Tensor | Sequence[Any]) -> list[torch.Tensor]:
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise CalibrationError(
                f"sequences must be a [N, T] tensor of token ids, got shape {list(sequences.shape)}"
            )
        result = list(sequences)
    else:
        result = [torch.as_tensor(seq) for seq in sequences]
    if not result:
        raise CalibrationError("no calibration sequences given")
    for index, seq in enumerate(result):
        if seq.dim() != 1 or seq.dtype.is_floating_point:
            raise CalibrationError(
                f"sequence {index} must be a 1-D tensor of token ids, got {seq.dtype} {list(seq.shape)}"
            )
    return [seq.long() for seq in result]


def _similarity_array(similarity: Any) -> np.ndarray:
    if isinstance(similarity, SimilarityResult):
        return similarity.similarity
    array = np.asarray(similarity, dtype=np.float64)
    if array.ndim != 3 or array.shape[1] != array.shape[2] or array.shape[0] < 1 or array.shape[1] < 1:
        raise GroupingError(f"similarity must be a [num_kv_heads, L, L] array, got shape {list(array.shape)}")
    if not np.isfinite(array).all():
        raise GroupingError("similarity has NaN or infinite entries")
    if array.min() < 0.0 or array.max() > 1.0:
        raise GroupingError(
            f"similarity values must lie in [0, 1] (1 - JS in bits), got [{array.min():.4g}, {array.max():.4g}]"
        )
    return array


def _check_delta(delta: float) -> float:
    if not 0.0 <= float(delta) <= 1.0:
        raise GroupingError(f"delta must be in [0, 1] (a similarity threshold), got {delta}")
    return float(delta)


def _check_block_size(block_size: int | None) -> int:
    if block_size is None:
        raise GroupingError("strategy 'fixed' needs block_size (layers per block, >= 1)")
    return _check_int("block_size", block_size, 1)


# ------------------------------------------------------------------------------------------ attention functions

# State of the running analysis. A context variable rather than a global so that the registered
# functions (looked up by name inside transformers) find it without a reference held in the registry.
_STATE: contextvars.ContextVar[Any] = contextvars.ContextVar("pod_grouping_state", default=None)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@dataclass
class _Capture:
    """Per layer: post-RoPE queries of the last ``n_queries`` positions and keys of the distant positions."""

    n_sink: int
    n_recent: int
    n_queries: int
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)


def _capture_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    state = _STATE.get()
    if isinstance(state, _Capture):
        seq_len = key.shape[2]
        # Distant keys of the last query end at position T - 1 - n_recent; earlier queries see a prefix
        # of this slice. Copies so that the layer's full q/k tensors can be freed; the keys (the bulk,
        # L x H x T x d) stay in the model's dtype and are cast per head when used.
        state.queries[module.layer_idx] = query[0, :, -state.n_queries :].float().clone()
        state.keys[module.layer_idx] = key[0, :, state.n_sink : seq_len - state.n_recent].clone()
        state.scaling[module.layer_idx] = scaling if scaling is not None else query.shape[-1] ** -0.5
    return _sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@dataclass
class _Proximal:
    """Prefix keys/values per layer; the tail queries attend to them (restricted or not)."""

    n_sink: int
    window: int | None = None  # None: full causal attention
    record: bool = True
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _proximal_attention(module, query, key, value, attention_mask, **kwargs):
    state = _STATE.get()
    if not isinstance(state, _Proximal):
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    if state.record:
        # The context (prefix) is computed with full causal attention, as a prefill would.
        state.prefix[module.layer_idx] = (key, value)
        return _sdpa(module, query, key, value, None, **kwargs)
    prefix_key, prefix_value = state.prefix[module.layer_idx]
    key = torch.cat([prefix_key, key], dim=2)
    value = torch.cat([prefix_value, value], dim=2)
    num_keys, num_queries = key.shape[2], query.shape[2]
    i = torch.arange(num_keys - num_queries, num_keys, device=query.device)[:, None]
    j = torch.arange(num_keys, device=query.device)[None, :]
    allowed = j <= i
    if state.window is not None:
        allowed = allowed & ((j < state.n_sink) | (i - j < state.window))
    # A [n_queries, T] boolean mask (True = attend); only the tail queries are ever masked this way.
    return _sdpa(module, query, key, value, allowed[None, None], **kwargs)


def _register_attention_functions() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE_ATTENTION, _capture_attention)
    AttentionInterface.register(_PROXIMAL_ATTENTION, _proximal_attention)


@contextmanager
def _attention(model: Any, name: str, state: Any) -> Iterator[None]:
    """Run ``model`` in eval mode with attention function ``name``; restore everything afterwards."""
    _register_attention_functions()
    original = model.config._attn_implementation
    was_training = model.training
    token = _STATE.set(state)
    model.eval()
    model.set_attn_implementation(name)
    try:
        # no_grad rather than inference_mode: returned logits stay ordinary tensors for the caller.
        with torch.no_grad():
            yield
    finally:
        model.set_attn_implementation(original)
        model.train(was_training)
        _STATE.reset(token)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ similarity


def _js_sums(capture: _Capture, seq_len: int, num_layers: int, groups: int, chunk_size: int) -> np.ndarray:
    """Sum over the last ``n_queries`` queries of ``JS(P_l || P_m)`` (bits), ``[H, L, L]`` upper triangle.

    Queries are taken ``chunk_size`` at a time, so at most ``[L, chunk_size, n_distant]``
    probabilities (float64) exist at once.
    """
    n_queries, n_sink, n_recent = capture.n_queries, capture.n_sink, capture.n_recent
    num_kv_heads = capture.keys[0].shape[0]
    n_dist = seq_len - n_sink - n_recent
    device = capture.keys[0].device
    # Query at position i = T - n_queries + r sees distant keys j in [n_sink, i - n_recent], i.e. the
    # first ``limit[r]`` entries of the captured slice.
    limit = torch.arange(seq_len - n_queries, seq_len, device=device) - n_recent - n_sink + 1
    columns = torch.arange(n_dist, device=device)
    sums = np.zeros((num_kv_heads, num_layers, num_layers))
    for head in range(num_kv_heads):
        heads = slice(head * groups, (head + 1) * groups)  # the query heads that share this KV head
        for start in range(0, n_queries, chunk_size):
            stop = min(n_queries, start + chunk_size)
            hidden = columns[None, :] >= limit[start:stop, None]
            probs = torch.empty(num_layers, stop - start, n_dist, dtype=torch.float64, device=device)
            for layer in range(num_layers):
                q = capture.queries[layer][heads, start:stop]
                k = capture.keys[layer][head].float()
                logits = (q @ k.T).double() * capture.scaling[layer]
                logits.masked_fill_(hidden, float("-inf"))
                # Softmax over the distant keys only == full attention renormalised over them;
                # the query heads of the GQA group are pooled by averaging their distributions.
                probs[layer] = torch.softmax(logits, dim=-1).mean(dim=0)
            plogp = torch.special.xlogy(probs, probs).sum(dim=-1)  # [L, c]
            for layer in range(num_layers - 1):
                mix = 0.5 * (probs[layer] + probs[layer + 1 :])
                # JS(P||Q) = H(M) - (H(P) + H(Q)) / 2 with M = (P + Q) / 2, in nats.
                js = 0.5 * (plogp[layer] + plogp[layer + 1 :]) - torch.special.xlogy(mix, mix).sum(dim=-1)
                js = (js / math.log(2)).clamp(0.0, 1.0)
                sums[head, layer, layer + 1 :] += js.sum(dim=-1).cpu().numpy()
    return sums


def analyze_similarity(
    model: Any,
    sequences: torch.Tensor | Sequence[torch.Tensor],
    *,
    n_sink: int,
    n_recent: int,
    n_queries: int,
    chunk_size: int = 16,
    progress: bool = True,
) -> SimilarityResult:
    """Inter-layer similarity of the attention over distant tokens, per KV head (METHOD.md section 3).

    For the last ``n_queries`` queries of each sequence, each layer's attention over the distant keys
    (key ``j`` is distant for query ``i`` when ``j >= n_sink`` and ``i - j >= n_recent``), per KV head
    (the query heads of a GQA group averaged), renormalised over the distant keys, is compared between
    layers: ``1 - JS(P_l || P_m)`` with log base 2, averaged over queries and sequences.

    Args:
        model: a transformers Llama causal LM (``config.model_type == "llama"``), any dtype/device.
        sequences: ``[N, T]`` token ids or a list of 1-D token tensors (lengths may differ); each
            must hold at least ``n_sink + n_recent + n_queries`` tokens.
        n_sink, n_recent: the proximal set, as in the PoD config.
        n_queries: how many of the last positions of each sequence serve as queries.
        chunk_size: queries per chunk of the distant-attention computation (bounds memory).
        progress: show a tqdm bar over the sequences.

    The model runs one sequence at a time with a recording attention function (restored afterwards);
    memory grows like ``T`` (the captured keys), never like ``T * T``.
    """
    _check_model(model)
    n_sink = _check_int("n_sink", n_sink, 0)
    n_recent = _check_int("n_recent", n_recent, 1)
    n_queries = _check_int("n_queries", n_queries, 1)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    seqs = _as_sequences(sequences)
    need = n_sink + n_recent + n_queries
    lengths = [len(seq) for seq in seqs]
    if min(lengths) < need:
        short = lengths.index(min(lengths))
        raise CalibrationError(
            f"calibration sequence {short} has {lengths[short]} tokens; with n_sink={n_sink}, "
            f"n_recent={n_recent}, n_queries={n_queries} every sequence must have at least "
            f"n_sink + n_recent + n_queries = {need} tokens (so that each query has a distant key)"
        )
    config = model.config
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = config.num_key_value_heads or num_heads
    groups = num_heads // num_kv_heads
    device = _device(model)
    sums = np.zeros((num_kv_heads, num_layers, num_layers))
    for seq in tqdm(seqs, desc="similarity", unit="seq", disable=not progress):
        capture = _Capture(n_sink=n_sink, n_recent=n_recent, n_queries=n_queries)
        with _attention(model, _CAPTURE_ATTENTION, capture):
            # logits_to_keep=1: the analysis needs no logits, and [T, vocab] would be the largest tensor.
            model(input_ids=seq[None].to(device), use_cache=False, logits_to_keep=1)
        if len(capture.keys) != num_layers:
            raise UnsupportedModelError(
                f"recorded attention of {len(capture.keys)} of {num_layers} layers; the model does not "
                "route its attention through transformers' AttentionInterface"
            )
        sums += _js_sums(capture, len(seq), num_layers, groups, chunk_size)
    mean_js = sums / (len(seqs) * n_queries)
    upper = np.clip(1.0 - mean_js, 0.0, 1.0)
    similarity = np.triu(upper, k=1) + np.swapaxes(np.triu(upper, k=1), 1, 2)
    similarity[:, np.arange(num_layers), np.arange(num_layers)] = 1.0
    return SimilarityResult(
        similarity=similarity,
        n_sink=n_sink,
        n_recent=n_recent,
        n_queries=n_queries,
        seq_len=min(lengths),
        num_sequences=len(seqs),
        model=str(getattr(config, "_name_or_path", "") or ""),
    )


# ------------------------------------------------------------------------------------------ grouping


def _greedy_starts_1d(sim: np.ndarray, delta: float) -> list[int]:
    """Block starts of one ``[L, L]`` similarity: a layer joins while its similarity to the anchor >= delta."""
    starts = [0]
    for layer in range(1, sim.shape[0]):
        if sim[starts[-1], layer] < delta:
            starts.append(layer)
    return starts


def _greedy(sim: np.ndarray, delta: float, per_layer: bool) -> GroupSpec:
    num_kv_heads, num_layers = sim.shape[0], sim.shape[1]
    if per_layer:
        starts = [_greedy_starts_1d(sim.mean(axis=0), delta)] * num_kv_heads
    else:
        starts = [_greedy_starts_1d(sim[head], delta) for head in range(num_kv_heads)]
    return GroupSpec.from_block_starts(starts, num_layers)


def retained_similarity(similarity: SimilarityResult | np.ndarray, spec: GroupSpec) -> float:
    """Mean over (layer, KV head) of the similarity of the layer to its anchor (an anchor counts 1).

    The quality side of a grouping: 1 for the original model (every layer its own anchor), lower the
    more the distant attention of the shared-key layers differs from their anchors'.
    """
    sim = _similarity_array(similarity)
    spec.check_model(sim.shape[1], sim.shape[0])
    anchors = np.array(spec.anchors)  # [L, H]
    heads = np.arange(sim.shape[0])[None, :]
    layers = np.arange(sim.shape[1])[:, None]
    return float(sim[heads, anchors, layers].mean())


def max_kv_saving(num_layers: int, num_kv_heads: int, *, seq_len: int, n_sink: int, n_recent: int) -> float:
    """The largest KV saving any grouping reaches: all layers of each KV head in one block."""
    return kv_saving(seq_len, n_sink, n_recent, num_kv_heads, num_layers, num_kv_heads)


def _saving_params(
    similarity: Any, seq_len: int | None, n_sink: int | None, n_recent: int | None
) -> tuple[int, int, int]:
    if isinstance(similarity, SimilarityResult):
        n_sink = similarity.n_sink if n_sink is None else n_sink
        n_recent = similarity.n_recent if n_recent is None else n_recent
    missing = [
        name
        for name, value in (("seq_len", seq_len), ("n_sink", n_sink), ("n_recent", n_recent))
        if value is None
    ]
    if missing:
        raise GroupingError(
            f"strategy 'target' needs {', '.join(missing)} (the context the saving is measured at)"
        )
    return (
        _check_int("seq_len", seq_len, 1),
        _check_int("n_sink", n_sink, 0),
        _check_int("n_recent", n_recent, 1),
    )


def search_delta(
    similarity: SimilarityResult | np.ndarray,
    target_saving: float,
    *,
    seq_len: int | None = None,
    n_sink: int | None = None,
    n_recent: int | None = None,
    per_layer: bool = False,
) -> float:
    """The greedy ``delta`` of the ``target`` strategy.

    Among the greedy groupings whose KV saving at ``seq_len`` is at least ``target_saving``, the one
    with the highest :func:`retained_similarity` (ties: the larger saving, then the larger delta).
    Greedy groupings only change where ``delta`` crosses a similarity value, so every such value is
    tried. They are all tried, not bisected: with anchor-based greedy the number of blocks is not
    monotone in ``delta`` (a lower ``delta`` can move an anchor and split a later block).
    ``n_sink`` / ``n_recent`` default to those of a :class:`SimilarityResult`.
    """
    sim = _similarity_array(similarity)
    seq_len, n_sink, n_recent = _saving_params(similarity, seq_len, n_sink, n_recent)
    target = float(target_saving)
    if not 0.0 <= target < 1.0:
        raise GroupingError(f"target_saving must be a fraction in [0, 1), got {target_saving}")
    num_kv_heads, num_layers = sim.shape[0], sim.shape[1]
    best_possible = max_kv_saving(num_layers, num_kv_heads, seq_len=seq_len, n_sink=n_sink, n_recent=n_recent)
    # A small tolerance: the target is often a saving computed by the same formula elsewhere.
    tolerance = 1e-12
    if target > best_possible + tolerance:
        raise UnreachableSavingError(
            f"a KV saving of {target:.4f} is not reachable at seq_len={seq_len} with n_sink={n_sink}, "
            f"n_recent={n_recent}: the maximum is {best_possible:.4f} (all layers of each KV head in one block)"
        )
    pool = sim.mean(axis=0, keepdims=True) if per_layer else sim
    upper = np.triu_indices(num_layers, k=1)
    values = np.unique(np.concatenate([pool[:, upper[0], upper[1]].ravel(), [0.0]]))
    candidates = [float(v) for v in values if 0.0 <= v <= 1.0]
    if values.max() < 1.0:
        candidates.append(float(np.nextafter(values.max(), 2.0)))  # no block at all
    best: tuple[float, float, float] | None = None
    for delta in candidates:
        spec = _greedy(sim, delta, per_layer)
        saving = spec.kv_saving(seq_len, n_sink, n_recent)
        if saving + tolerance >= target:
            key = (retained_similarity(sim, spec), saving, delta)
            best = key if best is None or key > best else best
    assert best is not None  # delta = 0 (one block per head) reaches every reachable target
    return best[2]


def group_layers(
    similarity: SimilarityResult | np.ndarray,
    strategy: str = "greedy",
    *,
    delta: float = 0.5,
    block_size: int | None = None,
    target_saving: float | None = None,
    seq_len: int | None = None,
    n_sink: int | None = None,
    n_recent: int | None = None,
    per_layer: bool = False,
) -> GroupSpec:
    """Partition the layers into blocks of consecutive layers, per KV head.

    Strategies:
        ``greedy`` (the paper): bottom-up; a block starts at the lowest layer, the next layer joins
        while its similarity to the block's anchor (first layer) is ``>= delta``, otherwise it starts
        a new block.
        ``fixed``: blocks of ``block_size`` layers (the last may be shorter), the same for all heads.
        ``target``: greedy with the ``delta`` chosen by :func:`search_delta`: KV saving at
        ``seq_len`` (with ``n_sink`` / ``n_recent``) ``>= target_saving`` and the highest
        :func:`retained_similarity`.

    ``per_layer=True`` gives all KV heads the same blocks, chosen on the head-mean similarity.
    ``similarity`` is a :class:`SimilarityResult` or a ``[num_kv_heads, L, L]`` array.
    """
    sim = _similarity_array(similarity)
    if strategy == "greedy":
        return _greedy(sim, _check_delta(delta), per_layer)
    if strategy == "fixed":
        return GroupSpec.fixed(sim.shape[1], sim.shape[0], _check_block_size(block_size))
    if strategy == "target":
        if target_saving is None:
            raise GroupingError("strategy 'target' needs target_saving (a fraction of the dense KV cache)")
        chosen = search_delta(
            similarity, target_saving, seq_len=seq_len, n_sink=n_sink, n_recent=n_recent, per_layer=per_layer
        )
        return _greedy(sim, chosen, per_layer)
    raise GroupingError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


# ------------------------------------------------------------------------------------------ proximal importance


def _tail_logits(
    model: Any, sequence: torch.Tensor, sizes: Sequence[int | None], *, n_sink: int, n_queries: int
) -> Iterator[torch.Tensor]:
    """Logits ``[n_queries, vocab]`` of the last positions, once per size (``None``: full attention).

    The context before the last ``n_queries`` positions runs once with full attention (a prefill);
    its keys and values are kept, and the last ``n_queries`` tokens then run once per size, attending
    in every layer only to the proximal tokens (and to each other within the window). A generator, so
    that only one size's ``[n_queries, vocab]`` logits exist at a time.
    """
    device = _device(model)
    prefix_len = len(sequence) - n_queries
    tail = sequence[None, prefix_len:].to(device)
    positions = torch.arange(prefix_len, len(sequence), device=device)[None]
    state = _Proximal(n_sink=n_sink)
    with _attention(model, _PROXIMAL_ATTENTION, state):
        model(input_ids=sequence[None, :prefix_len].to(device), use_cache=False, logits_to_keep=1)
        state.record = False
        for size in sizes:
            state.window = None if size is None else size - n_sink
            yield model(input_ids=tail, position_ids=positions, use_cache=False).logits[0].float()


def _check_proximal_args(
    sizes: Sequence[int], n_sink: int, n_queries: int, seqs: list[torch.Tensor]
) -> list[int]:
    n_sink = _check_int("n_sink", n_sink, 0)
    n_queries = _check_int("n_queries", n_queries, 1)
    # At least one recent token (the query's own) besides the sinks.
    checked = [_check_int("proximal size", size, n_sink + 1) for size in sizes]
    for index, seq in enumerate(seqs):
        if len(seq) <= n_queries:
            raise CalibrationError(
                f"sequence {index} has {len(seq)} tokens; proximal importance with n_queries={n_queries} "
                f"needs at least n_queries + 1 = {n_queries + 1}"
            )
    return checked


def proximal_logits(
    model: Any, sequence: torch.Tensor, size: int | None, *, n_sink: int, n_queries: int
) -> torch.Tensor:
    """Logits ``[n_queries, vocab]`` of the last ``n_queries`` positions of ``sequence`` when their
    queries attend, in every layer, only to ``size`` proximal tokens: the ``n_sink`` first tokens and
    the ``size - n_sink`` most recent ones (``size=None``: full attention). The context before them is
    computed with full attention, as a prefill would.
    """
    _check_model(model)
    seqs = _as_sequences([sequence])
    _check_proximal_args([] if size is None else [size], n_sink, n_queries, seqs)
    (logits,) = _tail_logits(model, seqs[0], [size], n_sink=n_sink, n_queries=n_queries)
    return logits


def proximal_importance(
    model: Any,
    sequences: torch.Tensor | Sequence[torch.Tensor],
    sizes: Sequence[int],
    *,
    n_sink: int,
    n_queries: int,
    progress: bool = True,
) -> ProximalImportance:
    """Agreement of the greedy next token with only ``n`` proximal tokens vs full attention, per ``n``.

    For the last ``n_queries`` positions of each sequence (see :func:`proximal_logits`): the fraction
    whose argmax with ``n`` proximal tokens equals the argmax with full attention, for each ``n`` in
    ``sizes`` (each ``> n_sink``; ``n >= T`` is full attention).
    """
    _check_model(model)
    seqs = _as_sequences(sequences)
    if not sizes:
        raise GroupingError("sizes is empty: give the numbers of proximal tokens to try")
    sizes = sorted(set(_check_proximal_args(sizes, n_sink, n_queries, seqs)))
    matches = np.zeros(len(sizes))
    for seq in tqdm(seqs, desc="proximal importance", unit="seq", disable=not progress):
        outputs = _tail_logits(model, seq, [None, *sizes], n_sink=n_sink, n_queries=n_queries)
        reference = next(outputs).argmax(dim=-1)
        for index, logits in enumerate(outputs):
            matches[index] += (logits.argmax(dim=-1) == reference).sum().item()
    return ProximalImportance(
        sizes=sizes,
        agreement=(matches / (len(seqs) * n_queries)).tolist(),
        n_sink=n_sink,
        n_queries=n_queries,
        seq_len=min(len(seq) for seq in seqs),
        num_sequences=len(seqs),
        model=str(getattr(model.config, "_name_or_path", "") or ""),
    )


# ------------------------------------------------------------------------------------------ command line


def read_texts(path: str | Path) -> Iterator[str]:
    """Documents of a calibration file: ``.txt`` is one document, ``.jsonl`` one ``"text"`` per line."""
    path = Path(path)
    if not path.is_file():
        raise GroupingError(f"calibration file not found: {path}")
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    if path.suffix != ".jsonl":
        raise GroupingError(f"{path}: unsupported calibration file type {path.suffix!r}; use .txt or .jsonl")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GroupingError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise GroupingError(f"{path}:{number}: expected a JSON object with a string field 'text'")
            yield record["text"]


def calibration_sequences(
    tokenizer: Any, path: str | Path, *, seq_len: int, num_sequences: int
) -> torch.Tensor:
    """Tokenize the documents of ``path`` into one stream (EOS between documents) and cut it into
    ``[n, seq_len]`` with ``n <= num_sequences``; reading stops once enough tokens are collected."""
    stream: list[int] = []
    wanted = seq_len * num_sequences
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in read_texts(path):
        stream.extend(tokenizer(text)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= wanted:
            break
    count = min(num_sequences, len(stream) // seq_len)
    if count == 0:
        raise CalibrationError(
            f"{path} gives {len(stream)} tokens; one calibration sequence needs --seq-len={seq_len} tokens"
        )
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _default_sizes(n_sink: int, seq_len: int) -> list[int]:
    """Powers of two above ``n_sink`` and below ``seq_len``, then ``seq_len`` itself (full attention,
    agreement 1 by construction: the end point that shows the measurement is consistent)."""
    return [2**k for k in range(1, 64) if n_sink < 2**k < seq_len] + [max(seq_len, n_sink + 1)]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pod.grouping",
        description="Choose PoD's layer blocks: attention similarity over distant tokens, grouping, plots.",
    )
    parser.add_argument("--model", required=True, help="local model folder (or Hub name when online)")
    parser.add_argument(
        "--data", required=True, help="calibration text: .txt (whole file) or .jsonl ('text' per line)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n-sink", type=int, default=16)
    parser.add_argument("--n-recent", type=int, default=4080)
    parser.add_argument(
        "--n-queries", type=int, default=64, help="last positions of each sequence used as queries"
    )
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens per calibration sequence")
    parser.add_argument("--num-sequences", type=int, default=8)
    parser.add_argument(
        "--chunk-size", type=int, default=16, help="queries per chunk of the similarity computation"
    )
    parser.add_argument("--strategy", choices=STRATEGIES, default="greedy")
    parser.add_argument("--delta", type=float, default=0.5, help="greedy similarity threshold in [0, 1]")
    parser.add_argument("--block-size", type=int, help="layers per block (strategy fixed)")
    parser.add_argument("--target-saving", type=float, help="KV-cache fraction to save (strategy target)")
    parser.add_argument(
        "--saving-seq-len", type=int, help="context at which the KV saving is computed (default: --seq-len)"
    )
    parser.add_argument("--per-layer", action="store_true", help="same blocks for all KV heads")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="proximal sizes for the importance curve (default: powers of two)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name, minimum in (
        ("n_sink", 0),
        ("n_recent", 1),
        ("n_queries", 1),
        ("seq_len", 1),
        ("num_sequences", 1),
        ("chunk_size", 1),
    ):
        value = getattr(args, name)
        if value < minimum:
            raise GroupingError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    need = args.n_sink + args.n_recent + args.n_queries
    if args.seq_len < need:
        raise CalibrationError(
            f"--seq-len={args.seq_len} is too short: calibration sequences must have at least "
            f"n_sink + n_recent + n_queries = {need} tokens"
        )
    if args.strategy == "greedy":
        _check_delta(args.delta)
    if args.strategy == "fixed":
        _check_block_size(args.block_size)
    if args.strategy == "target" and args.target_saving is None:
        raise GroupingError("--strategy target needs --target-saving")
    if args.strategy == "target" and not 0.0 <= args.target_saving < 1.0:
        raise GroupingError(f"--target-saving must be a fraction in [0, 1), got {args.target_saving}")
    if args.saving_seq_len is not None:
        _check_int("--saving-seq-len", args.saving_seq_len, 1)
    if args.sizes is not None:
        for size in args.sizes:
            _check_int("--sizes entry (more than --n-sink)", size, args.n_sink + 1)
    if not Path(args.data).is_file():
        raise GroupingError(f"calibration file not found: {args.data}")
    if Path(args.data).suffix not in (".txt", ".jsonl"):
        raise GroupingError(f"{args.data}: unsupported calibration file type; use .txt or .jsonl")


def run_grouping(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's work: load, analyse, group, measure proximal importance, then write ``args.out``.

    Everything is computed before the output folder is created, so a failure writes nothing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_args(args)
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type != "llama":
        raise UnsupportedModelError(
            f"{args.model}: model_type {config.model_type!r}; this stage analyses a Llama-architecture model "
            "(model_type 'llama') before its conversion to PoD"
        )
    saving_seq_len = args.saving_seq_len or args.seq_len
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    if args.strategy == "target":
        reachable = max_kv_saving(
            config.num_hidden_layers,
            num_kv_heads,
            seq_len=saving_seq_len,
            n_sink=args.n_sink,
            n_recent=args.n_recent,
        )
        if args.target_saving > reachable + 1e-12:
            raise UnreachableSavingError(
                f"--target-saving={args.target_saving} is not reachable at seq_len={saving_seq_len} with "
                f"n_sink={args.n_sink}, n_recent={args.n_recent}: the maximum is {reachable:.4f} "
                "(all layers of each KV head in one block)"
            )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sequences = calibration_sequences(
        tokenizer, args.data, seq_len=args.seq_len, num_sequences=args.num_sequences
    )
    if len(sequences) < args.num_sequences:
        print(
            f"note: {args.data} holds {len(sequences)} sequences of {args.seq_len} tokens, not {args.num_sequences}",
            file=sys.stderr,
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)

    progress = not args.quiet
    result = analyze_similarity(
        model,
        sequences,
        n_sink=args.n_sink,
        n_recent=args.n_recent,
        n_queries=args.n_queries,
        chunk_size=args.chunk_size,
        progress=progress,
    )
    result.model = args.model
    params: dict[str, Any] = {"strategy": args.strategy, "per_layer": args.per_layer}
    if args.strategy == "fixed":
        params["block_size"] = args.block_size
        spec = group_layers(result, "fixed", block_size=args.block_size)
    else:
        params["delta"] = args.delta
        if args.strategy == "target":
            # group_layers("target") is greedy at this delta; computed here to record it.
            params["target_saving"] = args.target_saving
            params["delta"] = search_delta(
                result, args.target_saving, seq_len=saving_seq_len, per_layer=args.per_layer
            )
        spec = group_layers(result, "greedy", delta=params["delta"], per_layer=args.per_layer)
    sizes = args.sizes or _default_sizes(args.n_sink, args.seq_len)
    curve = proximal_importance(
        model, sequences, sizes, n_sink=args.n_sink, n_queries=args.n_queries, progress=progress
    )
    curve.model = args.model

    from .plots import plot_proximal_importance, plot_similarity, plot_similarity_heads

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **params,
        "n_sink": args.n_sink,
        "n_recent": args.n_recent,
        "seq_len": saving_seq_len,
        "kv_saving": spec.kv_saving(saving_seq_len, args.n_sink, args.n_recent),
        "retained_similarity": retained_similarity(result, spec),
        "mean_block_size": spec.mean_block_size(),
        "calibration": {
            "data": str(args.data),
            "seq_len": args.seq_len,
            "num_sequences": len(sequences),
            "n_queries": args.n_queries,
        },
        "model": args.model,
    }
    result.save(out / "similarity.npz")
    spec.save(out / "groups.json", **summary)
    title = f"{Path(args.model).name}: {args.strategy}"
    plot_similarity(result, spec, out / "similarity.png", title=title)
    plot_similarity_heads(result, spec, out / "similarity_heads.png", title=title)
    curve.save(out / "proximal_importance.json")
    plot_proximal_importance(curve, out / "proximal_importance.png", title=Path(args.model).name)
    print(spec.describe())
    print(
        f"kv_saving at seq_len={saving_seq_len}: {summary['kv_saving']:.4f}  "
        f"retained similarity: {summary['retained_similarity']:.4f}  wrote {out}"
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pod.grouping``; bad input prints ``error: ...`` and returns 2."""
    args = _parser().parse_args(argv)
    try:
        run_grouping(args)
    except (ValueError, OSError) as err:  # GroupingError and GroupSpecError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
