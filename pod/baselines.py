"""The models PoD is compared with, built from the same source Llama, and equal-KV-budget choices.

All baselines run on PoD's own machinery (``distant_policy`` of :func:`pod.convert_llama`), so their
caches really hold only what they keep and ``PodCache.nbytes()`` equals
:func:`pod.kv_cache_bytes` for each of them:

========================  =========================================================================
``dense``                 the source ``LlamaForCausalLM`` (transformers' ``DynamicCache``)
``streaming_llm``         StreamingLLM-style: sinks + recent window only (``distant_policy="drop"``)
``cla``                   CLA-style: distant keys *and values* from the block's anchor (``"shared_kv"``)
``pod``                   PoD before adaptation (``"shared"``)
``pod_adapted``           PoD after adaptation (a model you pass in)
========================  =========================================================================

Two ways to set the baselines' free parameter:

* *same structure* (the paper's table): StreamingLLM keeps the same ``n_sink + n_recent`` proximal
  tokens as PoD, CLA shares over the same blocks. Budgets then differ (StreamingLLM saves most).
* *equal budget* (:func:`equalize_budget`): for a target number of KV bytes at ``seq_len`` (PoD's, by
  default) StreamingLLM gets the largest window, CLA the most anchors (the smallest blocks), whose
  bytes are ``<=`` the target. :func:`budget_report` states each model's bytes against it.

``pod_snapkv`` (:class:`PodSnapKV`): PoD plus SnapKV-style selection of distant tokens at prefill.
After the prompt, each (block, KV head) keeps only the ``keep`` distant slots that the prompt's last
``window`` queries attended most; the cache really drops the others. It is a decode-time wrapper
(prefill, compress, greedy decode), not a ``generate()``-compatible model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .convert import convert_llama
from .groups import GroupSpec, kv_cache_bytes

__all__ = [
    "BASELINES",
    "BudgetChoice",
    "PodSnapKV",
    "balanced_spec",
    "budget_report",
    "build_baselines",
    "equalize_budget",
]

BASELINES = ("dense", "streaming_llm", "cla", "pod", "pod_adapted")


@dataclass
class BudgetChoice:
    """A baseline's free parameter chosen to fit a KV budget at ``seq_len`` tokens (batch 1).

    ``parameter`` is ``"n_recent"`` (StreamingLLM-style window) or ``"num_anchors"`` (CLA-style: the
    number of (layer, KV head) anchors; ``mean_block_size = L * H / num_anchors``).
    """

    name: str
    parameter: str
    value: int
    n_sink: int
    n_recent: int
    anchors: list[list[int]]
    mean_block_size: float
    kv_bytes: int
    budget_bytes: int
    seq_len: int

    @property
    def spec(self) -> GroupSpec:
        return GroupSpec(tuple(tuple(row) for row in self.anchors))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"fill": self.kv_bytes / self.budget_bytes}


def _shape(config: Any) -> tuple[int, int]:
    return config.num_hidden_layers, config.num_key_value_heads or config.num_attention_heads


def _policy_config(config: Any, spec: GroupSpec, n_sink: int, n_recent: int, policy: str) -> SimpleNamespace:
    """The fields :func:`pod.kv_cache_bytes` reads, for a baseline not built yet."""
    return SimpleNamespace(
        num_hidden_layers=config.num_hidden_layers,
        num_key_value_heads=config.num_key_value_heads,
        num_attention_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        head_dim=getattr(config, "head_dim", None),
        dtype=getattr(config, "dtype", None),
        anchors=[list(row) for row in spec.anchors],
        n_sink=n_sink,
        n_recent=n_recent,
        distant_policy=policy,
        shared_key_init="anchor",
    )


def balanced_spec(num_layers: int, num_kv_heads: int, num_anchors: int) -> GroupSpec:
    """A group spec with exactly ``num_anchors`` (layer, KV head) anchors, blocks as even as possible.

    KV heads get ``num_anchors // H`` blocks each (the first ``num_anchors % H`` heads one more), and
    each head's layers are cut into that many consecutive blocks of near-equal size. With
    ``num_anchors = L * H / g`` this is :meth:`GroupSpec.fixed` with block size ``g``; other values
    give budgets between two fixed block sizes.
    """
    if not num_kv_heads <= num_anchors <= num_layers * num_kv_heads:
        raise ValueError(
            f"num_anchors={num_anchors} must be in [{num_kv_heads}, {num_layers * num_kv_heads}] "
            f"(one block per KV head .. every layer its own anchor) for {num_layers} layers x "
            f"{num_kv_heads} KV heads"
        )
    starts = []
    for head in range(num_kv_heads):
        blocks = num_anchors // num_kv_heads + (1 if head < num_anchors % num_kv_heads else 0)
        starts.append(sorted({(i * num_layers) // blocks for i in range(blocks)}))
    return GroupSpec.from_block_starts(starts, num_layers)


def equalize_budget(
    llama_config: Any,
    budget_bytes: int,
    seq_len: int,
    *,
    n_sink: int,
    n_recent: int,
    dtype: torch.dtype | None = None,
) -> dict[str, BudgetChoice]:
    """Each baseline's free parameter such that its KV bytes at ``seq_len`` are ``<= budget_bytes``
    and as close to it as the parameter allows (batch 1; bytes are linear in the batch).

    * ``streaming_llm``: the largest recent window ``w`` (with ``n_sink`` sinks); capped where the
      window covers the whole sequence (then it is the dense model).
    * ``cla``: with PoD's ``n_sink`` / ``n_recent``, the largest number of anchors (i.e. the
      smallest blocks, :func:`balanced_spec`) whose keys *and* values fit.

    Raises ``ValueError`` when the budget is below what the smallest such cache needs — for
    StreamingLLM the sinks plus a one-token window — saying how many bytes that is.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    num_layers, num_kv_heads = _shape(llama_config)
    identity = GroupSpec.identity(num_layers, num_kv_heads)

    def streaming_bytes(window: int) -> int:
        cfg = _policy_config(llama_config, identity, n_sink, window, "drop")
        return kv_cache_bytes(cfg, seq_len, 1, dtype)

    smallest = streaming_bytes(1)
    if smallest > budget_bytes:
        raise ValueError(
            f"KV budget {budget_bytes} bytes at seq_len={seq_len} is smaller than a StreamingLLM-style cache "
            f"of the {n_sink} sinks + a 1-token recent window ({smallest} bytes for {num_layers} layers x "
            f"{num_kv_heads} KV heads); raise the budget (e.g. PoD's bytes at this seq_len) or lower n_sink"
        )
    low, high = 1, max(1, seq_len - n_sink)  # beyond seq_len - n_sink the window holds everything
    while low < high:  # bytes grow with the window: the largest window that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if streaming_bytes(mid) <= budget_bytes else (low, mid - 1)
    streaming = BudgetChoice(
        name="streaming_llm",
        parameter="n_recent",
        value=low,
        n_sink=n_sink,
        n_recent=low,
        anchors=[list(row) for row in identity.anchors],
        mean_block_size=1.0,
        kv_bytes=streaming_bytes(low),
        budget_bytes=budget_bytes,
        seq_len=seq_len,
    )

    def cla_bytes(num_anchors: int) -> int:
        spec = balanced_spec(num_layers, num_kv_heads, num_anchors)
        return kv_cache_bytes(
            _policy_config(llama_config, spec, n_sink, n_recent, "shared_kv"), seq_len, 1, dtype
        )

    fewest = cla_bytes(num_kv_heads)
    if fewest > budget_bytes:
        raise ValueError(
            f"KV budget {budget_bytes} bytes at seq_len={seq_len} is smaller than the smallest CLA-style cache "
            f"(one block per KV head, n_sink={n_sink}, n_recent={n_recent}: {fewest} bytes); raise the budget "
            "or lower n_recent"
        )
    low, high = num_kv_heads, num_layers * num_kv_heads
    while low < high:  # bytes grow with the number of anchors
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cla_bytes(mid) <= budget_bytes else (low, mid - 1)
    spec = balanced_spec(num_layers, num_kv_heads, low)
    cla = BudgetChoice(
        name="cla",
        parameter="num_anchors",
        value=low,
        n_sink=n_sink,
        n_recent=n_recent,
        anchors=[list(row) for row in spec.anchors],
        mean_block_size=spec.mean_block_size(),
        kv_bytes=cla_bytes(low),
        budget_bytes=budget_bytes,
        seq_len=seq_len,
    )
    return {"streaming_llm": streaming, "cla": cla}


def build_baselines(
    llama: Any,
    spec: GroupSpec,
    *,
    n_sink: int,
    n_recent: int,
    seq_len: int,
    adapted: Any | None = None,
    equal_budget: bool = False,
    budget_bytes: int | None = None,
    attn_implementation: str = "sdpa",
    snapkv_keep: int | None = None,
) -> dict[str, Any]:
    """The compared models, all from the source ``llama`` (weights shared where possible, never copied twice).

    Args:
        llama: the source ``LlamaForCausalLM`` (returned as ``dense``).
        spec: PoD's group spec (``pod``, and ``cla`` unless ``equal_budget``).
        n_sink, n_recent: PoD's proximal region.
        seq_len: the context at which budgets are compared.
        adapted: the adapted PoD model, returned as ``pod_adapted`` (omitted when ``None``).
        equal_budget: ``False`` (the paper's setting): StreamingLLM keeps the same proximal tokens, CLA
            shares over the same blocks. ``True``: both fitted to ``budget_bytes`` at ``seq_len`` by
            :func:`equalize_budget`.
        budget_bytes: the target for ``equal_budget`` (default: PoD's KV bytes at ``seq_len``).
        snapkv_keep: add ``pod_snapkv``, a :class:`PodSnapKV` keeping this many distant slots per
            (block, KV head) around the adapted PoD model (the unadapted one when ``adapted`` is None).

    Returns ``{"dense", "streaming_llm", "cla", "pod"[, "pod_adapted"][, "pod_snapkv"]}`` in that
    order, all in eval mode.
    """
    num_layers, num_kv_heads = _shape(llama.config)
    convert = dict(attn_implementation=attn_implementation)
    pod_model = convert_llama(
        llama, spec, n_sink=n_sink, n_recent=n_recent, distant_policy="shared", **convert
    )
    if equal_budget:
        dtype = next(llama.parameters()).dtype
        budget = (
            budget_bytes if budget_bytes is not None else kv_cache_bytes(pod_model.config, seq_len, 1, dtype)
        )
        choice = equalize_budget(llama.config, budget, seq_len, n_sink=n_sink, n_recent=n_recent, dtype=dtype)
        window, cla_spec = choice["streaming_llm"].n_recent, choice["cla"].spec
    else:
        window, cla_spec = n_recent, spec
    models = {
        "dense": llama.eval(),
        "streaming_llm": convert_llama(
            llama,
            GroupSpec.identity(num_layers, num_kv_heads),
            n_sink=n_sink,
            n_recent=window,
            distant_policy="drop",
            **convert,
        ),
        "cla": convert_llama(
            llama, cla_spec, n_sink=n_sink, n_recent=n_recent, distant_policy="shared_kv", **convert
        ),
        "pod": pod_model,
    }
    if adapted is not None:
        models["pod_adapted"] = adapted.eval()
    if snapkv_keep is not None:
        models["pod_snapkv"] = PodSnapKV(models.get("pod_adapted", pod_model), snapkv_keep)
    return models


def budget_report(
    models: dict[str, Any],
    seq_len: int,
    *,
    budget_bytes: int | None = None,
    measure: bool = True,
    batch_size: int = 1,
) -> dict[str, dict[str, Any]]:
    """Each model's KV bytes at ``seq_len``: from the formula, measured (a real prefill), vs the budget.

    ``budget_bytes`` defaults to the ``pod`` model's bytes. ``saved`` is relative to the ``dense`` model
    when present (else to a dense cache of the same shape). Measuring prefills ``seq_len`` tokens per
    model; ``measure=False`` reports the formula only.
    """
    from .evaluation import kv_cache_bytes_measured

    def formula(model: Any) -> int:
        dtype = next(model.parameters()).dtype
        if isinstance(model, PodSnapKV):
            return model.cache_bytes(seq_len, batch_size, dtype)
        return kv_cache_bytes(model.config, seq_len, batch_size, dtype)

    any_model = next(iter(models.values()))
    dense = formula(models["dense"]) if "dense" in models else None
    if dense is None:
        cfg = any_model.config
        dense = kv_cache_bytes(
            SimpleNamespace(
                num_hidden_layers=cfg.num_hidden_layers,
                num_key_value_heads=cfg.num_key_value_heads,
                num_attention_heads=cfg.num_attention_heads,
                hidden_size=cfg.hidden_size,
                head_dim=getattr(cfg, "head_dim", None),
            ),
            seq_len,
            batch_size,
            next(any_model.parameters()).dtype,
        )
    if budget_bytes is None and "pod" in models:
        budget_bytes = formula(models["pod"])
    report = {}
    for name, model in models.items():
        nbytes = formula(model)
        row: dict[str, Any] = {
            "kv_bytes": nbytes,
            "kv_bytes_measured": kv_cache_bytes_measured(model, seq_len, batch_size) if measure else None,
            "saved": 1.0 - nbytes / dense,
        }
        config = model.config
        if isinstance(model, PodSnapKV):
            row.update(
                policy="shared+snapkv", keep=model.keep, n_sink=config.n_sink, n_recent=config.n_recent
            )
        elif getattr(config, "anchors", None) is not None:
            spec = GroupSpec(tuple(tuple(r) for r in config.anchors))
            row.update(
                policy=config.distant_policy,
                n_sink=config.n_sink,
                n_recent=config.n_recent,
                mean_block_size=spec.mean_block_size() if config.distant_policy != "drop" else None,
            )
        else:
            row.update(policy="dense")
        if budget_bytes is not None:
            row.update(budget_bytes=budget_bytes, fill=nbytes / budget_bytes)
        report[name] = row
    return report


# ------------------------------------------------------------------------------------------ PoD + SnapKV


class PodSnapKV:
    """PoD + SnapKV-style selection of distant tokens (a decode-time wrapper around a PoD model).

    At prefill the prompt runs through the PoD model as usual. Then, for every block (per KV head) the
    attention of the prompt's last ``window`` queries over the *distant* slots — every layer of the
    block, every query head of the KV group, softmax over the distant slots with the anchor's keys,
    summed, then average-pooled over ``kernel`` neighbouring slots as SnapKV does — ranks the
    distant slots, and only the ``keep`` best are kept: the anchor's keys and every layer's values
    at those slots. Sinks and the recent window stay whole. Decoding then runs on this smaller
    :class:`~pod.PodCache` unchanged: the kept slots are distant for every later query, so they need
    no true position, only their (already rotated) keys.

    Each KV head keeps its own slots, so the compacted slot axis means "the i-th kept slot of this
    head"; all heads keep the same number. After a prefill of ``T`` tokens the cache holds
    ``pod.kv_cache_bytes(config, n_sink + min(keep, n_distant) + n_recent)`` bytes
    (:meth:`cache_bytes`), which ``nbytes()`` of the returned cache equals.
    """

    def __init__(self, model: Any, keep: int, *, window: int = 16, kernel: int = 7):
        config = model.config
        if getattr(config, "distant_policy", None) != "shared":
            raise ValueError(
                "PodSnapKV wraps a PoD model (distant_policy='shared'); got "
                f"{getattr(config, 'distant_policy', type(model).__name__)!r}"
            )
        if keep < 0 or window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"keep must be >= 0, window >= 1 and kernel an odd number >= 1; got keep={keep}, "
                f"window={window}, kernel={kernel}"
            )
        self.model, self.keep, self.window, self.kernel = model, keep, window, kernel
        self.spec = GroupSpec(tuple(tuple(row) for row in config.anchors))

    @property
    def config(self) -> Any:
        return self.model.config

    def parameters(self):
        """The wrapped model's parameters (so that device / dtype lookups work on the wrapper)."""
        return self.model.parameters()

    def cache_bytes(self, seq_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
        """Bytes of the compressed cache after a prefill of ``seq_len`` tokens."""
        cfg = self.config
        distant = max(0, seq_len - cfg.n_sink - cfg.n_recent)
        kept = seq_len - distant + min(self.keep, distant)
        dtype = dtype or next(self.model.parameters()).dtype
        return kv_cache_bytes(cfg, kept, batch_size, dtype)

    # -------------------------------------------------------------------------------- prefill

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Run the prompt ``[B, T]`` (unpadded), compress the cache; returns ``(cache, last logits [B, V])``."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        from .modeling_pod_llama import PodCache

        model, window = self.model, self.window
        queries: dict[int, torch.Tensor] = {}

        def capture(module: Any, args: tuple) -> None:
            hidden, cos, sin = args[0][:, -window:], args[3][0][:, -window:], args[3][1][:, -window:]
            q = (
                module.q_proj(hidden)
                .view(hidden.shape[0], hidden.shape[1], -1, module.head_dim)
                .transpose(1, 2)
            )
            queries[module.layer_idx] = apply_rotary_pos_emb(q, q, cos, sin)[0]

        layers = model.model.layers
        handles = [layer.self_attn.register_forward_pre_hook(capture) for layer in layers]
        cache = PodCache(model.config)
        try:
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
        self._compress(cache, queries)
        return cache, out.logits[:, -1]

    def _compress(self, cache: Any, queries: dict[int, torch.Tensor]) -> None:
        layers = self.model.model.layers
        first = cache.layers[0]
        sink_len, start, length = first.sink_len, first.window_start, first.length
        distant = start - sink_len
        if distant <= self.keep:
            return  # nothing to drop
        attn0 = layers[0].self_attn
        groups = self.config.num_attention_heads // attn0.num_kv_heads
        batch = cache.positions.shape[0]
        selected: dict[tuple[int, int], torch.Tensor] = {}  # (anchor layer, kv head) -> [B, keep] slots
        for head in range(attn0.num_kv_heads):
            for first_layer, end in self.spec.blocks(head):
                anchor = layers[first_layer].self_attn
                keys = cache.layers[first_layer].full["k"][:, anchor.anchor_heads.index(head), sink_len:start]
                score = torch.zeros(batch, distant, dtype=torch.float32, device=keys.device)
                for layer in range(first_layer, end):
                    q = queries[layer][:, head * groups : (head + 1) * groups]  # [B, G, w, d]
                    logits = torch.einsum("bgwd,bsd->bgws", q.float(), keys.float()) * anchor.scaling
                    score += logits.softmax(-1).sum(dim=(1, 2))
                pooled = F.avg_pool1d(score[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
                top = pooled.topk(self.keep, dim=-1).indices.sort(dim=-1).values
                selected[(first_layer, head)] = top + sink_len
        device = cache.positions.device
        head_slots = torch.arange(sink_len, device=device), torch.arange(start, length, device=device)

        def index(layer: int, heads: list[int]) -> torch.Tensor:
            rows = []
            for head in heads:
                kept = selected[(self.spec.anchors[layer][head], head)]
                sinks, recent = (t.expand(batch, -1) for t in head_slots)
                rows.append(torch.cat([sinks, kept, recent], dim=1))
            return torch.stack(rows, dim=1)  # [B, heads, slots]

        for layer_idx, layer in enumerate(cache.layers):
            attn = layers[layer_idx].self_attn
            for name, heads in (("v", list(range(attn.num_kv_heads))), ("k", attn.anchor_heads)):
                if name not in layer.full:
                    continue
                tensor = layer.full[name]
                slots = index(layer_idx, heads).to(tensor.device)
                gathered = torch.gather(tensor, 2, slots[..., None].expand(-1, -1, -1, tensor.shape[-1]))
                layer.full[name] = gathered.contiguous()
            layer.length = sink_len + self.keep + (length - start)
            layer.window_start = sink_len + self.keep
        # Any positions between the sinks and the window serve the kept slots: they only need to be
        # distant (and not 0, which would start a new document) for every later query.
        positions = cache.positions
        cache.positions = torch.cat(
            [positions[:, :sink_len], positions[:, sink_len : sink_len + self.keep], positions[:, start:]],
            dim=1,
        )

    # -------------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation ``[B, max_new_tokens]`` of unpadded prompts ``[B, T]`` on the compressed cache."""
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        cache, logits = self.prefill(input_ids)
        total = input_ids.shape[1]
        tokens = [logits.argmax(-1)]
        for step in range(max_new_tokens - 1):
            position = torch.full((input_ids.shape[0], 1), total + step, device=device)
            out = self.model(
                input_ids=tokens[-1][:, None], position_ids=position, past_key_values=cache, use_cache=True
            )
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1)

    def generate_fn(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """``generate`` for one prompt as a list of ids (the ``generate_fn`` of ``passkey_grid``)."""
        return self.generate(torch.tensor([prompt_ids]), max_new_tokens)[0].tolist()

    @torch.no_grad()
    def suffix_loss(self, rows: torch.Tensor, prefix_len: int) -> dict[str, Any]:
        """Next-token loss of the tokens after ``prefix_len`` of each row ``[N, T]``, the prefix's cache
        compressed: the prefix is prefilled and compressed, then the suffix runs on that cache."""
        device = next(self.model.parameters()).device
        total, count = 0.0, 0
        for row in rows:
            row = row[None].to(device)
            cache, logits = self.prefill(row[:, :prefix_len])
            positions = torch.arange(prefix_len, row.shape[1], device=device)[None]
            out = self.model(
                input_ids=row[:, prefix_len:-1],
                position_ids=positions[:, :-1],
                past_key_values=cache,
                use_cache=True,
            )
            all_logits = torch.cat([logits[:, None], out.logits], dim=1)[0].float()
            total += F.cross_entropy(all_logits, row[0, prefix_len:], reduction="sum").item()
            count += row.shape[1] - prefix_len
        return {"loss": total / count, "tokens": count}
