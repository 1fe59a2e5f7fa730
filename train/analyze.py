"""Stage ``analyze``: inter-layer attention similarity on calibration rows -> the group spec + plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from train.common import PipelineError, RunPaths, resolve_device, source_model_path, stage, torch_dtype

__all__ = ["load_source_llama", "run_analyze"]

log = logging.getLogger("pod.pipeline")


def load_source_llama(cfg: DictConfig, paths: RunPaths) -> Any:
    """The pretrained Llama (checked to be a Llama), in ``model.dtype``."""
    from pod.convert import ConversionError, load_llama

    path = source_model_path(cfg, paths)
    try:
        return load_llama(path, dtype=torch_dtype(cfg.model.dtype))
    except ConversionError as err:
        raise PipelineError(f"model.name_or_path: {err}") from err


@stage("analyze")
def run_analyze(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Similarity of every pair of layers per KV head, grouped into blocks (``analyze.strategy``).

    Writes ``similarity.npz``, ``groups.json`` (with a summary), ``proximal_importance.json`` and
    the plots into ``<run_dir>/analyze/``.
    """
    from pod.grouping import (
        GroupingError,
        analyze_similarity,
        group_layers,
        proximal_importance,
        retained_similarity,
        search_delta,
    )
    from pod.plots import plot_proximal_importance, plot_similarity, plot_similarity_heads
    from train.rows import build_rows, load_tokenizer, take_rows

    out = paths.stage("analyze")
    a, pod_cfg = cfg.analyze, cfg.pod
    model = load_source_llama(cfg, paths).to(resolve_device(cfg.device)).eval()
    tokenizer = load_tokenizer(cfg, paths)
    rows, _ = build_rows(
        cfg,
        tokenizer,
        cfg.data.sources,
        seq_len=a.seq_len,
        max_rows=a.max_docs,
        what="data.sources (calibration)",
    )
    calibration = take_rows(rows, a.n_sequences)
    count = len(calibration)
    if count < a.n_sequences:
        log.warning(
            "analyze: only %d calibration rows of %d tokens (analyze.n_sequences=%d)",
            count,
            a.seq_len,
            a.n_sequences,
        )
    sequences = torch.tensor([row["input_ids"] for row in calibration], dtype=torch.long)

    try:
        with torch.no_grad():
            similarity = analyze_similarity(
                model, sequences, n_sink=pod_cfg.n_sink, n_recent=pod_cfg.n_recent, n_queries=a.n_queries
            )
            spec = group_layers(
                similarity,
                a.strategy,
                delta=a.delta,
                block_size=a.block_size,
                target_saving=a.target_saving,
                seq_len=cfg.data.seq_len,
                n_sink=pod_cfg.n_sink,
                n_recent=pod_cfg.n_recent,
                per_layer=a.per_layer,
            )
            sizes = [2**k for k in range(1, 40) if pod_cfg.n_sink < 2**k < a.seq_len] or [pod_cfg.n_sink + 1]
            importance = proximal_importance(
                model, sequences, sizes, n_sink=pod_cfg.n_sink, n_queries=a.n_queries
            )
    except GroupingError as err:
        raise PipelineError(f"analyze: {err}") from err

    delta = a.delta
    if a.strategy == "target":
        delta = search_delta(
            similarity,
            a.target_saving,
            seq_len=cfg.data.seq_len,
            n_sink=pod_cfg.n_sink,
            n_recent=pod_cfg.n_recent,
            per_layer=a.per_layer,
        )
    summary = {
        "strategy": a.strategy,
        "delta": delta if a.strategy != "fixed" else None,
        "block_size": a.block_size if a.strategy == "fixed" else None,
        "target_saving": a.target_saving if a.strategy == "target" else None,
        "per_layer": a.per_layer,
        "n_sink": pod_cfg.n_sink,
        "n_recent": pod_cfg.n_recent,
        "seq_len": cfg.data.seq_len,
        "kv_saving": spec.kv_saving(cfg.data.seq_len, pod_cfg.n_sink, pod_cfg.n_recent),
        "num_anchors": spec.num_anchors,
        "mean_block_size": spec.mean_block_size(),
        "retained_similarity": retained_similarity(similarity, spec),
        "calibration": {"sequences": count, "seq_len": a.seq_len, "n_queries": a.n_queries},
        "model": source_model_path(cfg, paths),
    }
    similarity.save(out / "similarity.npz")
    spec.save(out / "groups.json", **summary)
    importance.save(out / "proximal_importance.json")
    title = f"{Path(summary['model']).name}: {a.strategy}"
    plots = [
        plot_similarity(similarity, spec, out / "similarity.png", title=title),
        plot_similarity_heads(similarity, spec, out / "similarity_heads.png", title=title),
        plot_proximal_importance(
            importance, out / "proximal_importance.png", title=Path(summary["model"]).name
        ),
    ]
    log.info("analyze: blocks\n%s", spec.describe())
    log.info(
        "analyze: %d anchors, mean block %.2f layers, theoretical KV saving %.1f%% at %d tokens",
        spec.num_anchors,
        summary["mean_block_size"],
        100 * summary["kv_saving"],
        cfg.data.seq_len,
    )
    return {
        "groups": str(out / "groups.json"),
        "plots": [str(p) for p in plots],
        "kv_saving": summary["kv_saving"],
        "mean_block_size": summary["mean_block_size"],
        "num_anchors": spec.num_anchors,
        "retained_similarity": summary["retained_similarity"],
        "proximal_importance": dict(zip(importance.sizes, importance.agreement, strict=True)),
    }
