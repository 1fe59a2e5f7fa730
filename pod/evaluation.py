"""Evaluation of PoD models and their baselines: perplexity, passkey retrieval, KV bytes, speed.

Every function takes a model (a :class:`~pod.PodLlamaForCausalLM` or a plain transformers
``LlamaForCausalLM``) and token ids, and returns a JSON-able ``dict`` (plots go to a given path), so
that the pipeline's evaluate stage, the replication script and a notebook all call the same code.

Passkey samples are duck-typed — any object with ``prompt_ids: list[int]``, ``answer: str``,
``depth: float`` and ``context_len: int`` (``data.synthetic.PasskeySample`` is one) — so that this
module does not import ``data/`` (dependencies point downward: ``pod`` imports nothing of the repo).

Bad input raises :class:`EvaluationError` (a ``ValueError``) saying what, where and how to fix it.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .groups import kv_cache_bytes

__all__ = [
    "EvaluationError",
    "PasskeySampleLike",
    "cache_nbytes",
    "greedy_continuations",
    "check_context",
    "kv_cache_bytes_measured",
    "max_batch_size",
    "measure_max_batch_size",
    "passkey_correct",
    "passkey_grid",
    "perplexity",
    "plot_passkey_heatmap",
    "throughput",
]


class EvaluationError(ValueError):
    """Input that an evaluation cannot run on (too long for the model, out of range, malformed)."""


class PasskeySampleLike(Protocol):
    """What :func:`passkey_grid` reads from a sample (``data.synthetic.PasskeySample`` fits)."""

    prompt_ids: Sequence[int]
    answer: str
    depth: float
    context_len: int


# ------------------------------------------------------------------------------------------ helpers


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    # Timings on CUDA must wait for the queued kernels, or they measure only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_positions(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(model_or_config: Any, length: int, what: str = "sequence") -> None:
    """Raise :class:`EvaluationError` unless ``length`` tokens fit the model's positions.

    A Llama has no positions beyond ``max_position_embeddings`` (its RoPE was never trained there),
    so a longer context would silently measure extrapolation rather than the cache policy.
    """
    limit = _max_positions(model_or_config)
    if limit is not None and length > limit:
        raise EvaluationError(
            f"{what}: {length} tokens, but the model holds at most max_position_embeddings={limit}; "
            f"use contexts of at most {limit} tokens, or a model with a longer context "
            "(larger max_position_embeddings / rope_scaling)"
        )


def cache_nbytes(cache: Any) -> int:
    """Bytes of the keys and values a cache really holds.

    A :class:`~pod.PodCache` counts its own tensors (``nbytes()``); a transformers ``Cache`` (e.g. the
    ``DynamicCache`` of a plain Llama) is summed over its layers' ``keys`` / ``values`` tensors.
    """
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise EvaluationError(
            f"cannot count the bytes of a {type(cache).__name__}: expected a PodCache or a transformers "
            "Cache with .layers[i].keys/.values"
        )
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _random_ids(model: Any, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    # Ids from 3 upwards: the low ids are special tokens (pad / bos / eos) in the tokenizers used here.
    low = 3 if vocab > 3 else 0
    return torch.randint(low, vocab, (batch_size, seq_len), generator=generator)


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------ perplexity


def _as_rows(rows: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, position_ids)`` 1-D pairs from a ``[N, T]`` tensor or a sequence of rows."""
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise EvaluationError(
                f"rows: expected a [N, T] tensor of token ids, got shape {list(rows.shape)}"
            )
        rows = list(rows)
    out = []
    for index, row in enumerate(rows):
        if isinstance(row, dict) or hasattr(row, "keys"):
            if "input_ids" not in row:
                raise EvaluationError(
                    f"rows[{index}]: a dict row needs 'input_ids' (and optionally 'position_ids')"
                )
            ids = torch.as_tensor(list(row["input_ids"]), dtype=torch.long)
            pos = row.get("position_ids") if hasattr(row, "get") else None
            pos = torch.arange(len(ids)) if pos is None else torch.as_tensor(list(pos), dtype=torch.long)
        else:
            ids = torch.as_tensor(row if isinstance(row, torch.Tensor) else list(row)).long()
            pos = torch.arange(len(ids))
        if ids.dim() != 1 or len(ids) < 2:
            raise EvaluationError(
                f"rows[{index}]: expected at least 2 token ids in a 1-D row, got {list(ids.shape)}"
            )
        if pos.shape != ids.shape:
            raise EvaluationError(
                f"rows[{index}]: position_ids has {len(pos)} entries for {len(ids)} input_ids"
            )
        out.append((ids, pos))
    if not out:
        raise EvaluationError("rows is empty: give at least one row of token ids")
    return out


def _bucket_edges(buckets: int | Sequence[int], max_position: int) -> list[int]:
    """Half-open bucket edges over the positions of predicted tokens (position 0 is never predicted)."""
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        count = _check_positive("buckets", buckets)
        top = max_position + 1
        edges = sorted({1 + round(i * (top - 1) / count) for i in range(count + 1)})
        return edges if len(edges) > 1 else [1, top]
    edges = [int(e) for e in buckets]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or edges[0] < 0:
        raise EvaluationError(
            f"buckets: expected an int or at least two strictly increasing non-negative position edges, got {edges}"
        )
    return edges


@torch.no_grad()
def perplexity(
    model: Any,
    rows: Any,
    *,
    batch_size: int = 4,
    buckets: int | Sequence[int] = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token loss and perplexity, overall and per bucket of token positions.

    Args:
        model: a causal LM (PoD or plain Llama); run with ``use_cache=False``.
        rows: a ``[N, T]`` LongTensor, or a sequence of dicts with ``input_ids`` and optional
            ``position_ids`` (packed documents restart at position 0), or of plain id lists.
        batch_size: rows per forward (rows of different lengths never share a batch).
        buckets: ``k`` equal-width buckets over the predicted positions ``[1, max position]``, or the
            bucket edges ``[e0, e1, ..., ek]`` (half-open ``[e_i, e_{i+1})``, by position id).

    A token is predicted from the tokens before it in its document: a token at position id 0 (a
    document start) is not scored. Its bucket is its own position id, i.e. how much context of its
    document precedes it — the axis on which distant-token policies differ.

    Returns ``{"loss", "ppl", "tokens", "buckets": [{"start", "end", "tokens", "loss", "ppl"}]}``;
    ``loss`` is the token-weighted mean (nats), equal to the token-weighted mean of the buckets' losses
    when the buckets cover every scored position. Buckets without tokens have ``loss`` ``None``.
    """
    batch_size = _check_positive("batch_size", batch_size)
    pairs = _as_rows(rows)
    max_len = max(len(ids) for ids, _ in pairs)
    check_context(model, max_len, "perplexity rows")
    edges = _bucket_edges(buckets, max(int(pos.max()) for _, pos in pairs))
    device = _device(model)
    loss_sum = torch.zeros(len(edges) - 1, dtype=torch.float64)
    count = torch.zeros(len(edges) - 1, dtype=torch.long)
    total_sum, total_count = 0.0, 0
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, (ids, _) in enumerate(pairs):
        by_length[len(ids)].append(index)
    batches = [
        indices[i : i + batch_size]
        for indices in by_length.values()
        for i in range(0, len(indices), batch_size)
    ]
    boundaries = torch.tensor(edges[1:-1], dtype=torch.long)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
        ids = torch.stack([pairs[i][0] for i in batch]).to(device)
        pos = torch.stack([pairs[i][1] for i in batch]).to(device)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
        target, target_pos = ids[:, 1:], pos[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).double()
        target_pos = target_pos.reshape(-1).cpu()
        scored = target_pos > 0
        losses, target_pos = losses.cpu()[scored], target_pos[scored]
        total_sum += float(losses.sum())
        total_count += int(scored.sum())
        inside = (target_pos >= edges[0]) & (target_pos < edges[-1])
        which = torch.bucketize(target_pos[inside], boundaries, right=True)
        loss_sum += torch.bincount(which, weights=losses[inside], minlength=len(edges) - 1)
        count += torch.bincount(which, minlength=len(edges) - 1)
    if total_count == 0:
        raise EvaluationError("rows: no token to score (every row is a single-token document)")
    loss = total_sum / total_count
    result_buckets = []
    for b in range(len(edges) - 1):
        n = int(count[b])
        bucket_loss = float(loss_sum[b]) / n if n else None
        result_buckets.append(
            {
                "start": edges[b],
                "end": edges[b + 1],
                "tokens": n,
                "loss": bucket_loss,
                "ppl": _ppl(bucket_loss) if bucket_loss is not None else None,
            }
        )
    return {"loss": loss, "ppl": _ppl(loss), "tokens": total_count, "buckets": result_buckets}


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


# ------------------------------------------------------------------------------------------ passkey

_NUMBER = re.compile(r"\d+")


def passkey_correct(continuation: str, answer: str) -> bool:
    """True iff the first number (maximal run of digits) in ``continuation`` is exactly ``answer``.

    The whole run must match: ``"123456"`` does not answer ``"12345"``, nor ``"1234"``.
    """
    match = _NUMBER.search(continuation)
    return match is not None and match.group(0) == str(answer).strip()


def _check_samples(model: Any, samples: Sequence[Any], max_new_tokens: int) -> None:
    if not samples:
        raise EvaluationError("passkey_grid: no samples given")
    for index, sample in enumerate(samples):
        for name in ("prompt_ids", "answer", "depth", "context_len"):
            if not hasattr(sample, name):
                raise EvaluationError(
                    f"passkey sample {index}: has no '{name}' (needs prompt_ids, answer, depth, context_len)"
                )
        depth = float(sample.depth)
        if not 0.0 <= depth <= 1.0:
            raise EvaluationError(
                f"passkey sample {index}: needle depth {sample.depth} is outside [0, 1] "
                "(0 = start of the context, 1 = its end); build the sample with a depth in [0, 1]"
            )
        if model is not None:
            where = f"passkey sample {index} (context_len={sample.context_len}, depth={sample.depth})"
            check_context(model, int(sample.context_len), where)
            check_context(model, len(sample.prompt_ids) + max_new_tokens, f"{where}, prompt + max_new_tokens")


def _pad_id(model: Any) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


@torch.no_grad()
def greedy_continuations(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 1
) -> list[list[int]]:
    """Greedy ``generate`` with the model's own cache (a PodCache for PoD); new tokens per prompt.

    Prompts of equal length are batched (no padding, so every row is computed as it would be alone).
    """
    device = _device(model)
    pad = _pad_id(model)
    out: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        by_length[len(prompt)].append(index)
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long, device=device)
            generated = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
            )
            for row, i in enumerate(chunk):
                out[i] = generated[row, length:].tolist()
    return out  # type: ignore[return-value]


def passkey_grid(
    model: Any,
    samples: Sequence[Any],
    *,
    decode: Callable[[list[int]], str],
    max_new_tokens: int = 8,
    batch_size: int = 1,
    generate_fn: Callable[[list[int], int], list[int]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Passkey (needle-in-a-haystack) accuracy per ``(context_len, depth)`` cell.

    Each sample's prompt is continued greedily for ``max_new_tokens`` tokens with the model's own
    cache (so a StreamingLLM-style model really has forgotten what left its window); the
    continuation is decoded with ``decode`` and is correct iff its first number is the answer
    (:func:`passkey_correct`). ``generate_fn(prompt_ids, max_new_tokens) -> new_ids`` replaces the
    model (``model`` may then be ``None``), e.g. for an oracle or a random guesser in tests.

    Returns ``{"accuracy", "samples", "context_lens", "depths", "matrix", "cells", "predictions"}``:
    ``matrix[i][j]`` is the accuracy at ``context_lens[i]`` and ``depths[j]`` (``None`` for an empty
    cell), ``cells`` the same as records, ``predictions`` one record per sample.
    """
    max_new_tokens = _check_positive("max_new_tokens", max_new_tokens)
    if model is None and generate_fn is None:
        raise EvaluationError("passkey_grid: give a model or a generate_fn")
    _check_samples(model, samples, max_new_tokens)
    prompts = [list(s.prompt_ids) for s in samples]
    if generate_fn is not None:
        bar = tqdm(prompts, desc="passkey", unit="sample", disable=not progress, leave=False)
        continuations = [list(generate_fn(p, max_new_tokens)) for p in bar]
    else:
        continuations = []
        step = max(1, batch_size) * 4
        bar = tqdm(total=len(prompts), desc="passkey", unit="sample", disable=not progress, leave=False)
        # Chunks only so that the progress bar moves; batching happens within each chunk.
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            continuations += greedy_continuations(model, chunk, max_new_tokens, batch_size)
            bar.update(len(chunk))
        bar.close()
    records = []
    cells: dict[tuple[int, float], list[bool]] = defaultdict(list)
    for sample, new_ids in zip(samples, continuations, strict=True):
        text = decode(list(new_ids))
        ok = passkey_correct(text, sample.answer)
        key = (int(sample.context_len), float(sample.depth))
        cells[key].append(ok)
        records.append(
            {
                "context_len": key[0],
                "depth": key[1],
                "answer": str(sample.answer),
                "output": text,
                "correct": ok,
            }
        )
    context_lens = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    matrix = [
        [(sum(cells[(c, d)]) / len(cells[(c, d)])) if cells.get((c, d)) else None for d in depths]
        for c in context_lens
    ]
    cell_records = [
        {"context_len": c, "depth": d, "n": len(v), "correct": int(sum(v)), "accuracy": sum(v) / len(v)}
        for (c, d), v in sorted(cells.items())
    ]
    correct = sum(r["correct"] for r in records)
    return {
        "accuracy": correct / len(records),
        "samples": len(records),
        "context_lens": context_lens,
        "depths": depths,
        "matrix": matrix,
        "cells": cell_records,
        "predictions": records,
    }


def plot_passkey_heatmap(result: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """PNG heatmap of a :func:`passkey_grid` result: context lengths (rows) x needle depths (columns)."""
    import numpy as np

    from .plots import _figure

    matrix = np.array([[np.nan if v is None else v for v in row] for row in result["matrix"]], dtype=float)
    contexts, depths = result["context_lens"], result["depths"]
    figure = _figure(1.1 + 0.75 * max(3, len(depths)), 1.3 + 0.45 * max(3, len(contexts)))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    axes.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    axes.set_yticks(range(len(contexts)), [str(c) for c in contexts])
    axes.set_xlabel("needle depth (0 = start of the context)")
    axes.set_ylabel("context length (tokens)")
    for i in range(len(contexts)):
        for j in range(len(depths)):
            if not np.isnan(matrix[i, j]):
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="passkey accuracy")
    axes.set_title(f"{title + ': ' if title else ''}passkey accuracy {result['accuracy']:.2f}", fontsize=9)
    path = Path(path)
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------ KV bytes


@torch.no_grad()
def kv_cache_bytes_measured(
    model: Any, seq_len: int, batch_size: int = 1, *, input_ids: torch.Tensor | None = None, seed: int = 0
) -> int:
    """Bytes of the KV cache after a prefill of ``seq_len`` tokens, read from the cache itself.

    Runs ``model(ids, use_cache=True)`` on random (or the given ``[batch, seq_len]``) token ids and
    counts what the returned cache holds (:func:`cache_nbytes`): ``PodCache.nbytes()`` for PoD and its
    baselines, the ``DynamicCache`` tensors for a plain Llama. A wrapper with ``prefill(ids) -> (cache,
    logits)`` (:class:`pod.baselines.PodSnapKV`) is measured after its compression.
    """
    seq_len = _check_positive("seq_len", seq_len)
    batch_size = _check_positive("batch_size", batch_size)
    check_context(model, seq_len, "kv_cache_bytes_measured")
    ids = (_random_ids(model, batch_size, seq_len, seed) if input_ids is None else input_ids).to(
        _device(model)
    )
    if hasattr(model, "prefill"):  # a decode-time wrapper that compresses its cache (pod.baselines.PodSnapKV)
        return cache_nbytes(model.prefill(ids)[0])
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return cache_nbytes(out.past_key_values)


def max_batch_size(
    model_config: Any, seq_len: int, budget_bytes: int, dtype: torch.dtype | None = None
) -> int:
    """Largest batch whose KV cache at ``seq_len`` tokens fits ``budget_bytes``, from the formula.

    The cache is linear in the batch (every row holds the same slots), so this is
    ``budget // pod.kv_cache_bytes(config, seq_len, 1, dtype)``; ``0`` when not even one sequence
    fits. A plain Llama config gives the dense cache. :func:`measure_max_batch_size` checks it by
    prefilling real batches.
    """
    seq_len = _check_positive("seq_len", seq_len)
    budget_bytes = _check_positive("budget_bytes", budget_bytes)
    per_sequence = kv_cache_bytes(model_config, seq_len, 1, dtype)
    return budget_bytes // per_sequence


def measure_max_batch_size(model: Any, seq_len: int, budget_bytes: int, *, max_batch: int = 16) -> int:
    """Largest batch ``<= max_batch`` whose measured cache after a ``seq_len`` prefill fits ``budget_bytes``.

    Prefills real batches (doubling, then bisection) and reads the cache's bytes; independent of the
    formula, so it verifies :func:`max_batch_size` at small sizes. Returns 0 when batch 1 does not fit.
    """
    max_batch = _check_positive("max_batch", max_batch)
    budget_bytes = _check_positive("budget_bytes", budget_bytes)

    def fits(batch: int) -> bool:
        return kv_cache_bytes_measured(model, seq_len, batch) <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= max_batch and fits(high):
        low, high = high, high * 2
    high = min(high, max_batch + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high) (or high > max_batch)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


# ------------------------------------------------------------------------------------------ speed


@torch.no_grad()
def throughput(
    model: Any, seq_len: int, batch_size: int = 1, decode_steps: int = 16, *, repeats: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Prefill and decode speed with the model's own cache, on random token ids.

    One prefill of ``[batch_size, seq_len]`` tokens, then ``decode_steps`` single-token steps
    (greedy, each reusing the cache). A short warm-up run first keeps one-time costs (allocation,
    kernel selection) out of the timing; the best of ``repeats`` runs is reported.

    Returns ``{"prefill_s", "prefill_tokens_per_s", "decode_s", "decode_tokens_per_s",
    "kv_bytes", "seq_len", "batch_size", "decode_steps", "device"}`` (``kv_bytes`` after the decode).
    """
    seq_len = _check_positive("seq_len", seq_len)
    batch_size = _check_positive("batch_size", batch_size)
    decode_steps = _check_positive("decode_steps", decode_steps)
    repeats = _check_positive("repeats", repeats)
    check_context(model, seq_len + decode_steps, "throughput: seq_len + decode_steps")
    device = _device(model)
    ids = _random_ids(model, batch_size, seq_len, seed).to(device)

    def run(prompt: torch.Tensor, steps: int) -> tuple[float, float, int]:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        _sync(device)
        t1 = time.perf_counter()
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1, cache_nbytes(cache)

    run(ids[:, : min(seq_len, 16)], 2)
    best = min((run(ids, decode_steps) for _ in range(repeats)), key=lambda r: r[0] + r[1])
    prefill_s, decode_s, nbytes = best
    return {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "decode_steps": decode_steps,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch_size * seq_len / prefill_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": batch_size * decode_steps / decode_s,
        "kv_bytes": nbytes,
        "device": str(device),
    }
