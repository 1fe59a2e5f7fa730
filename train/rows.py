"""Corpus access for the stages: build with ``data.corpus``, split off held-out rows, collate batches."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from train.common import PipelineError, RunPaths, tokenizer_path

__all__ = [
    "PackedCollator",
    "build_rows",
    "check_sources",
    "collate",
    "heldout_rows",
    "load_tokenizer",
    "take_rows",
    "train_eval_rows",
]

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".gz", ".zst", ".arrow")


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed rows into ``input_ids``, ``position_ids`` and ``labels``.

    ``labels`` are the input ids, except at the first token of each document (position id 0): that
    token cannot be predicted from the previous document, which the model does not attend to.
    """
    input_ids = torch.tensor([list(row["input_ids"]) for row in rows], dtype=torch.long)
    position_ids = torch.tensor([list(row["position_ids"]) for row in rows], dtype=torch.long)
    labels = input_ids.masked_fill(position_ids == 0, -100)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class PackedCollator:
    """Data collator for the Trainer (a class so that it pickles for dataloader workers)."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(rows)


def load_tokenizer(cfg: DictConfig, paths: RunPaths) -> Any:
    """The tokenizer of the source model (``model.tokenizer`` or the model's folder / name)."""
    from data.tokenizer import load_tokenizer as _load

    name = tokenizer_path(cfg, paths)
    try:
        return _load(name)
    except (OSError, ValueError) as err:
        raise PipelineError(f"model.tokenizer: cannot load a tokenizer from {name!r}: {err}") from err


def _is_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and not source.endswith(_LOCAL_SUFFIXES)


def _has_document(path: Path, text_field: str) -> bool:
    """True when a local source holds at least one non-empty document (reads until it finds one)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix in (".jsonl", ".json"):
            with file.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return True  # not ours to judge here: build_corpus reports bad lines with on_error
                    if not isinstance(record, dict) or str(record.get(text_field) or "").strip():
                        return True
        elif file.stat().st_size > 0:
            return True
    return False


def check_sources(cfg: DictConfig, paths: RunPaths, produced_here: bool) -> None:
    """Fail fast on data sources that are missing or hold no documents.

    ``produced_here``: the ``base`` stage of this run writes files into the run folder, so sources
    there that do not exist yet are fine. Hub dataset names are checked when the corpus is built.
    """
    for key in ("sources", "eval_sources"):
        sources = list(cfg.data[key])
        if key == "sources" and not sources:
            raise PipelineError(
                "data.sources is empty: give local files (jsonl/txt/parquet) or a Hub dataset name"
            )
        for index, source in enumerate(sources):
            path = Path(source).expanduser()
            if path.exists():
                if not _has_document(path, cfg.data.text_field):
                    raise PipelineError(
                        f"data.{key}[{index}]={source}: empty corpus (no document with a non-empty "
                        f"'{cfg.data.text_field}' field)"
                    )
                continue
            if produced_here and path.resolve().is_relative_to(paths.root):
                continue
            if _is_hub_name(source):
                continue
            raise PipelineError(f"data.{key}[{index}]={source}: file not found (and not a Hub dataset name)")


def build_rows(
    cfg: DictConfig,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    seq_len: int,
    max_rows: int | None = None,
    what: str = "data.sources",
) -> tuple[Any, Any]:
    """``data.corpus.build_corpus`` with the run's settings; errors become :class:`PipelineError`."""
    from data.corpus import DataError, build_corpus

    try:
        rows, report = build_corpus(
            list(sources),
            tokenizer,
            seq_len,
            str(Path(cfg.data.cache_dir).expanduser()),
            text_field=cfg.data.text_field,
            on_error=cfg.data.on_error,
            num_proc=cfg.data.num_proc,
            streaming=cfg.data.streaming,
            max_rows=max_rows,
        )
    except DataError as err:
        raise PipelineError(f"{what}: {err}") from err
    if not cfg.data.streaming and len(rows) == 0:
        raise PipelineError(f"{what}: empty corpus (no packed row of {seq_len} tokens from {list(sources)})")
    return rows, report


def take_rows(rows: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows of a ``Dataset`` or a streaming ``IterableDataset``."""
    if hasattr(rows, "select"):
        return [rows[i] for i in range(min(n, len(rows)))]
    return list(rows.take(n))


def train_eval_rows(cfg: DictConfig, tokenizer: Any) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Training rows and held-out rows: the first ``data.eval_rows`` rows of ``data.eval_sources``,
    else the last ``data.eval_rows`` rows of the corpus (the first ones of a stream), never trained on.
    """
    rows, report = build_rows(
        cfg, tokenizer, cfg.data.sources, seq_len=cfg.data.seq_len, max_rows=cfg.data.max_rows
    )
    n_eval = cfg.data.eval_rows
    if cfg.data.eval_sources:
        held, _ = build_rows(
            cfg, tokenizer, cfg.data.eval_sources, seq_len=cfg.data.seq_len, what="data.eval_sources"
        )
        held, train = take_rows(held, n_eval), rows
    elif cfg.data.streaming:
        held, train = take_rows(rows, n_eval), rows.skip(n_eval)
    else:
        if len(rows) <= n_eval:
            raise PipelineError(
                f"data.sources give {len(rows)} rows of {cfg.data.seq_len} tokens; holding out data.eval_rows="
                f"{n_eval} leaves none to train on: add data, lower data.eval_rows or set data.eval_sources"
            )
        train = rows.select(range(len(rows) - n_eval))
        held = take_rows(rows.select(range(len(rows) - n_eval, len(rows))), n_eval)
    n_train = None if cfg.data.streaming else len(train)
    summary = {
        "sources": list(cfg.data.sources),
        "eval_sources": list(cfg.data.eval_sources),
        "seq_len": cfg.data.seq_len,
        "streaming": bool(cfg.data.streaming),
        "train_rows": n_train,
        "train_tokens": None if n_train is None else n_train * cfg.data.seq_len,
        "eval_rows": len(held),
        "report": _report_dict(report),
    }
    return train, held, summary


def heldout_rows(cfg: DictConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Only the held-out rows of :func:`train_eval_rows` (cheap when ``data.eval_sources`` is set)."""
    if cfg.data.eval_sources:
        held, _ = build_rows(
            cfg, tokenizer, cfg.data.eval_sources, seq_len=cfg.data.seq_len, what="data.eval_sources"
        )
        return take_rows(held, cfg.data.eval_rows)
    return train_eval_rows(cfg, tokenizer)[1]


def _report_dict(report: Any) -> Any:
    if report is None:
        return None
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if hasattr(report, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(report)
    return str(report)
