"""Stage ``base`` (tiny preset): build a small pretrained Llama here, with no network.

Trains a byte-level BPE tokenizer on Python standard-library text, writes a local corpus (stdlib
documents mixed with passkey documents, as jsonl) and pretrains a small GQA Llama on it for a few
minutes. The result is cached in ``base.cache_dir/<hash of the base settings>/`` so later runs (and
other run folders) reuse it; the run folder's ``base/`` gets a copy of the corpus files, which the
tiny preset's ``data.sources`` point at.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from train.common import PipelineError, RunPaths, config_hash, read_json, stage, write_json

__all__ = ["run_base"]

log = logging.getLogger("pod.pipeline")


def cache_entry(cfg: DictConfig) -> Path:
    """``base.cache_dir/<hash of the other base settings>``: where this base model is (or will be)."""
    settings = OmegaConf.to_container(cfg.base, resolve=True)
    cache_root = Path(settings.pop("cache_dir")).expanduser().resolve()
    return cache_root / config_hash(settings)


# A run whose cached model was deleted (or whose base.cache_dir moved) builds it again.
@stage("base", rerun=lambda cfg: not (cache_entry(cfg) / "DONE").is_file())
def run_base(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Build (or reuse from the cache) the tiny tokenizer, corpus and pretrained Llama."""
    cached = cache_entry(cfg)
    key = cached.name
    if (cached / "DONE").is_file():
        log.info("base: reusing the cached tiny Llama %s", cached)
    else:
        _build(cfg.base, cached)
    out = paths.stage("base")
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copyfile(cached / "corpus" / name, out / name)
    return {
        "model_dir": str(cached / "model"),
        "cache_key": key,
        "train_jsonl": str(out / "train.jsonl"),
        "eval_jsonl": str(out / "eval.jsonl"),
        "report": read_json(cached / "report.json"),
    }


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def _build(base: DictConfig, target: Path) -> None:
    """Build into a temporary sibling and rename it into place, so a cache entry is never partial."""
    from data.corpus import build_corpus
    from data.synthetic import passkey_documents
    from data.text_sources import stdlib_documents
    from data.tokenizer import train_tokenizer

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "corpus").mkdir(parents=True)
    t0 = time.perf_counter()

    texts = stdlib_documents(max_chars=base.stdlib_chars, seed=base.seed)
    if len(texts) < 2:
        raise PipelineError(f"base: stdlib_documents gave {len(texts)} documents; raise base.stdlib_chars")
    rng = random.Random(base.seed)
    rng.shuffle(texts)
    n_eval = max(1, int(len(texts) * base.eval_fraction))
    eval_texts, train_texts = texts[:n_eval], texts[n_eval:]
    log.info("base: training a %d-token tokenizer on %d stdlib documents", base.vocab_size, len(train_texts))
    tokenizer = train_tokenizer(train_texts, base.vocab_size, out_dir=None)
    log.info("base: tokenizer ready (%.0f s)", time.perf_counter() - t0)

    passkeys = passkey_documents(tokenizer, base.passkey_docs, base.passkey_doc_len, seed=base.seed)
    n_eval_pk = max(1, int(len(passkeys) * base.eval_fraction))
    train_docs = train_texts + passkeys[n_eval_pk:]
    eval_docs = eval_texts + passkeys[:n_eval_pk]
    rng.shuffle(train_docs)
    rng.shuffle(eval_docs)
    _write_jsonl(tmp / "corpus" / "train.jsonl", train_docs)
    _write_jsonl(tmp / "corpus" / "eval.jsonl", eval_docs)

    rows, _ = build_corpus(
        [str(tmp / "corpus" / "train.jsonl")], tokenizer, base.seq_len, str(tmp / "corpus_cache")
    )
    log.info("base: %d packed rows of %d tokens (%.0f s)", len(rows), base.seq_len, time.perf_counter() - t0)
    model, report = _pretrain(base, tokenizer, rows)
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    shutil.rmtree(tmp / "corpus_cache", ignore_errors=True)
    report.update(
        documents={"train": len(train_docs), "eval": len(eval_docs), "passkey": len(passkeys)},
        rows=len(rows),
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_json(tmp / "report.json", report)
    (tmp / "DONE").write_text("ok\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:
        # Another process finished the same cache entry first; theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(base: DictConfig, tokenizer: Any, rows: Any) -> tuple[Any, dict[str, Any]]:
    """A nanoGPT-sized loop: AdamW, linear warmup + cosine decay, random packed rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.rows import collate

    torch.manual_seed(base.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_layers,
        num_attention_heads=base.num_heads,
        num_key_value_heads=base.num_kv_heads,
        max_position_embeddings=max(4096, base.seq_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=base.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < base.warmup_steps:
            return (step + 1) / base.warmup_steps
        progress = (step - base.warmup_steps) / max(1, base.steps - base.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(base.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(base.steps), desc="base pretrain", unit="step")
    for _ in bar:
        index = torch.randint(len(rows), (base.batch_size,), generator=generator).tolist()
        batch = collate([rows[i] for i in index])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    tokens = base.steps * base.batch_size * base.seq_len
    log.info(
        "base: pretrained %d steps, loss %.3f -> %.3f, %.0f tokens/s",
        base.steps,
        losses[0],
        losses[-1],
        tokens / seconds,
    )
    report = {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": base.steps,
        "tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "loss_start": sum(losses[:10]) / len(losses[:10]),
        "loss_end": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
    }
    return model.eval(), report
