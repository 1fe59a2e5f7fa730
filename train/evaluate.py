"""Stage ``evaluate``: dense vs converted vs adapted — held-out loss, passkey accuracy, KV bytes."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from train.common import RunPaths, read_done, resolve_device, stage, torch_dtype, write_json

__all__ = ["heldout_loss", "passkey_eval", "run_evaluate"]

log = logging.getLogger("pod.pipeline")


@torch.no_grad()
def heldout_loss(model: Any, rows: Any, batch_size: int, device: str, desc: str = "loss") -> float:
    """Token-weighted mean next-token loss over packed held-out rows (document starts excluded)."""
    from train.rows import collate

    total, count = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        batch = collate([rows[i] for i in range(start, min(len(rows), start + batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1][valid].float(), labels[valid], reduction="sum"
        ).item()
        count += int(valid.sum())
    return total / max(1, count)


@torch.no_grad()
def passkey_eval(model: Any, tokenizer: Any, samples: list[Any], device: str) -> float:
    """Fraction of passkey samples answered right by greedy generation (``data.synthetic`` scoring)."""
    from data.synthetic import passkey_accuracy

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        prompt = torch.tensor([prompt_ids], device=device)
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return out[0, prompt.shape[1] :].tolist()

    return passkey_accuracy(generate, samples, tokenizer=tokenizer)


def _load(name: str, cfg: DictConfig, paths: RunPaths) -> Any | None:
    """One of the compared models, or ``None`` when its stage has not run."""
    from pod import PodLlamaForCausalLM
    from train.adapt import load_adapted
    from train.analyze import load_source_llama

    if name == "dense":
        return load_source_llama(cfg, paths)
    done = read_done(paths, "convert" if name == "converted" else "adapt")
    if done is None:
        log.warning("evaluate: skipping %s (its stage has not run in %s)", name, paths.root)
        return None
    if name == "converted":
        return PodLlamaForCausalLM.from_pretrained(
            done["outputs"]["model_dir"], dtype=torch_dtype(cfg.model.dtype)
        )
    return load_adapted(cfg, paths)


@stage("evaluate")
def run_evaluate(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Evaluate every model of ``evaluate.models``; writes ``evaluate/metrics.json`` and the W&B summary."""
    import pod
    from data.synthetic import make_passkey_sample
    from train.rows import heldout_rows, load_tokenizer

    e = cfg.evaluate
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg, paths)
    held = heldout_rows(cfg, tokenizer)
    samples = [
        make_passkey_sample(
            tokenizer, e.passkey_context_len, e.passkey_depths[i % len(e.passkey_depths)], seed=1000 + i
        )
        for i in range(e.passkey_samples)
    ]
    dtype = torch_dtype(cfg.model.dtype)
    results: list[dict[str, Any]] = []
    dense_bytes = None
    for name in e.models:
        model = _load(name, cfg, paths)
        if model is None:
            continue
        model = model.to(device).eval()
        loss = heldout_loss(model, held, e.batch_size, device, desc=f"{name} loss")
        accuracy = passkey_eval(model, tokenizer, samples, device) if samples else None
        kv = pod.kv_cache_bytes(model.config, e.kv_seq_len, 1, dtype)
        if name == "dense":
            dense_bytes = kv
        else:
            dense_bytes = dense_bytes or pod.kv_cache_bytes(
                _dense_config(model.config), e.kv_seq_len, 1, dtype
            )
        results.append(
            {
                "model": name,
                "loss": loss,
                "perplexity": math.exp(min(loss, 50.0)),
                "passkey": accuracy,
                "kv_bytes": kv,
            }
        )
        log.info(
            "evaluate: %-9s loss %.4f  ppl %.2f  passkey %s  KV %d bytes",
            name,
            loss,
            math.exp(min(loss, 50)),
            accuracy,
            kv,
        )
        del model
    for row in results:
        row["kv_saved"] = 1.0 - row["kv_bytes"] / dense_bytes if dense_bytes else None
    metrics = {
        "kv_seq_len": e.kv_seq_len,
        "dense_kv_bytes": dense_bytes,
        "heldout_rows": len(held),
        "seq_len": cfg.data.seq_len,
        "passkey": {
            "samples": len(samples),
            "context_len": e.passkey_context_len,
            "depths": list(e.passkey_depths),
        },
        "results": results,
    }
    write_json(paths.stage("evaluate") / "metrics.json", metrics)
    if cfg.logging.wandb:
        _log_wandb(cfg, paths, metrics)
    return metrics


def _dense_config(config: Any) -> Any:
    """The same config with every layer its own anchor: what the dense cache would hold."""
    from types import SimpleNamespace

    fields = {
        k: getattr(config, k)
        for k in ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size")
    }
    return SimpleNamespace(
        **fields, head_dim=getattr(config, "head_dim", None), dtype=getattr(config, "dtype", None)
    )


def _log_wandb(cfg: DictConfig, paths: RunPaths, metrics: dict[str, Any]) -> None:
    """Add the evaluation to the W&B run of ``adapt`` (same run id, resumed)."""
    import wandb

    from train.adapt import setup_wandb_env

    setup_wandb_env(cfg, paths)
    run = wandb.init(name=cfg.run_name)
    columns = ["model", "loss", "perplexity", "passkey", "kv_bytes", "kv_saved"]
    table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in metrics["results"]])
    flat = {
        f"eval/{row['model']}/{k}": v
        for row in metrics["results"]
        for k, v in row.items()
        if k != "model" and v is not None
    }
    run.log({"eval/table": table, **flat})
    run.summary.update(flat)
    run.finish()
