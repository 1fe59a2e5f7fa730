"""Stage ``export``: a self-contained, loadable folder, and the optional push to the Hugging Face Hub.

The folder holds the adapted model (LoRA merged) saved with ``save_pretrained`` — which copies PoD's
modeling files next to it, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``
loads it without this repository — the tokenizer, ``groups.json`` and a model card ``README.md``.
It is written to a temporary sibling folder and renamed at the end, so an export is never partial.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from train.common import (
    PipelineError,
    RunPaths,
    read_done,
    read_json,
    require,
    source_model_path,
    stage,
    torch_dtype,
)

__all__ = ["PushError", "model_card", "push_to_hub", "retry_command", "run_export"]

log = logging.getLogger("pod.pipeline")


class PushError(Exception):
    """The upload to the Hub failed; the local export is kept."""


def _target(cfg: DictConfig) -> Path:
    return Path(cfg.export.dir).expanduser().resolve()


@stage("export", rerun=lambda cfg: bool(cfg.export.overwrite) or not _target(cfg).exists())
def run_export(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Write the export folder (see the module docstring); never replaces one unless ``export.overwrite``."""
    from train.adapt import load_adapted
    from train.rows import load_tokenizer

    target = _target(cfg)
    if target.exists() and not cfg.export.overwrite:
        raise PipelineError(
            f"export.dir={target} already exists and was not written by this run's export stage; "
            "set export.overwrite=true to replace it, or choose another export.dir"
        )
    require(paths, "adapt", "export")
    groups = require(paths, "analyze", "export")["groups"]
    dtype = torch_dtype(cfg.export.dtype or cfg.model.dtype)
    model = load_adapted(cfg, paths, dtype=dtype)
    tokenizer = load_tokenizer(cfg, paths)

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.copyfile(groups, tmp / "groups.json")
    (tmp / "README.md").write_text(model_card(cfg, paths, model.config))

    replaced = target.exists()
    if replaced:
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        log.warning("export: export.overwrite=true: replaced the existing export at %s", target)
    else:
        tmp.rename(target)
    log.info("export: wrote %s", target)
    return {"dir": str(target), "replaced": replaced, "files": sorted(p.name for p in target.iterdir())}


# ---------------------------------------------------------------------------------------- model card


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _source_name(source: str) -> str:
    """A local file by its name (its folder means nothing to a reader of the card), a Hub name as is."""
    return Path(source).name if Path(source).exists() else source


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def results_table(metrics: dict[str, Any] | None) -> str:
    """The evaluation as a Markdown table (model, loss, perplexity, passkey, KV bytes, KV saved)."""
    if not metrics or not metrics.get("results"):
        return "_Not evaluated._\n"
    lines = [
        f"| model | held-out loss | perplexity | passkey accuracy | KV cache @ {metrics['kv_seq_len']} tokens | KV saved |",
        "|---|---|---|---|---|---|",
    ]
    for row in metrics["results"]:
        passkey = "-" if row.get("passkey") is None else f"{row['passkey']:.2f}"
        saved = "-" if row.get("kv_saved") is None else f"{100 * row['kv_saved']:.1f}%"
        lines.append(
            f"| {row['model']} | {row['loss']:.4f} | {row['perplexity']:.2f} | {passkey} | "
            f"{_fmt_bytes(row['kv_bytes'])} | {saved} |"
        )
    return "\n".join(lines) + "\n"


def model_card(cfg: DictConfig, paths: RunPaths, config: Any) -> str:
    """README.md of the export: what it is, PoD settings, training data, evaluation, how to load it."""
    analyze = require(paths, "analyze", "export")
    adapt = require(paths, "adapt", "export")
    evaluation = (read_done(paths, "evaluate") or {}).get("outputs")
    groups = read_json(analyze["groups"])
    source = source_model_path(cfg, paths)
    base_model = source if not Path(source).exists() else None
    data = adapt.get("data", {})
    repo = cfg.export.repo_id or "path/to/this/folder"
    front = ["---", "library_name: transformers", "tags: [pod, kv-cache-compression, llama, long-context]"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    method = "LoRA (merged)" if adapt.get("adapter") else "full fine-tuning"
    return "\n".join(
        front
        + [
            "",
            f"# {cfg.run_name}: PoD Llama",
            "",
            f"`{source}` converted to **PoD** (*Compressing KV Cache for Long-Context LLM Inference with "
            "Inter-Layer Attention Similarity*, arXiv 2412.02252) and adapted with a short continued training. "
            "Consecutive layers share the keys of *distant* tokens (per KV head, within blocks of layers; "
            "values are never shared), so the KV cache keeps distant keys once per block instead of once per layer.",
            "",
            "## PoD settings",
            "",
            f"- proximal tokens: `n_sink` = {config.n_sink} attention sinks + `n_recent` = {config.n_recent} recent tokens",
            f"- shared keys: `{config.shared_key_init}`; blocks chosen by `{groups.get('strategy')}` "
            f"(delta {groups.get('delta')}) on the layers' attention similarity",
            f"- {groups.get('num_anchors', '?')} anchors over {config.num_hidden_layers} layers x "
            f"{config.num_key_value_heads} KV heads (mean block {groups.get('mean_block_size', 0):.2f} layers); "
            f"theoretical KV saving {100 * groups.get('kv_saving', 0):.1f}% at {groups.get('seq_len')} tokens",
            "- the blocks per KV head are in `groups.json` and in `config.json` (`anchors[layer][kv_head]`)",
            "",
            "## Training",
            "",
            f"- {method}, {adapt.get('steps')} steps, {adapt.get('tokens'):,} tokens, sequence length {cfg.data.seq_len}, "
            f"LR {cfg.train.lr} {cfg.train.lr_scheduler}"
            + (f", self-distillation (alpha {cfg.train.distill.alpha})" if cfg.train.distill.enabled else ""),
            f"- data: {', '.join(_source_name(x) for x in data.get('sources', [])) or '-'} "
            f"({data.get('train_rows') or 'streamed'} packed rows of {cfg.data.seq_len} tokens)",
            f"- training loss {_num(adapt.get('loss_start'))} -> {_num(adapt.get('loss_end'))} "
            "(mean of the first / last quarter of logged steps)",
            "",
            "## Evaluation",
            "",
            results_table(evaluation),
            "`dense` is the original model, `converted` the PoD model before adaptation, `adapted` this model. "
            "Loss on held-out packed rows; passkey = greedy retrieval of a number hidden in filler text; "
            f"KV bytes of the cache layout in {cfg.model.dtype}, batch 1.",
            "",
            "## How to load",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            'out = model.generate(**tokenizer("def fibonacci(n):", return_tensors="pt"), max_new_tokens=32)',
            "```",
            "",
            "`trust_remote_code=True` runs the PoD modeling files shipped in this folder "
            "(`modeling_pod_llama.py`, `configuration_pod_llama.py`, `groups.py`); `generate()` uses a PoD "
            "cache that keeps distant keys once per block.",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------- the Hub


def retry_command(cfg: DictConfig) -> str:
    """The command that re-runs only the push, with the overrides this job was started with."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            dropped = ("stages=", "export.push_to_hub=", "export.repo_id=", "export.overwrite=", "run_dir=")
            overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(dropped)]
    except ImportError:
        pass
    overrides += [
        f"run_dir={Path(cfg.run_dir).resolve()}",
        "stages=[export]",
        "export.push_to_hub=true",
        f"export.repo_id={cfg.export.repo_id}",
    ]
    script = Path(__file__).resolve().parent / "run.py"
    return " ".join([shlex.quote(sys.executable), shlex.quote(str(script)), *map(shlex.quote, overrides)])


def push_to_hub(cfg: DictConfig, folder: str | Path) -> str:
    """Upload the export with ``HfApi().upload_folder`` (token from ``HF_TOKEN``; never logged).

    Raises :class:`PushError` with the commands to retry; the local folder is kept either way.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    repo_id = cfg.export.repo_id
    try:
        api = HfApi(token=os.environ.get("HF_TOKEN") or None)
        api.create_repo(repo_id, repo_type="model", private=cfg.export.private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"PoD export {cfg.run_name}",
        )
    except Exception as err:  # any failure (network, auth, quota) keeps the export and says how to retry
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise PushError(
            f"push to https://huggingface.co/{repo_id} failed ({reason}); the export is kept at {folder}. "
            f"Retry with: {retry_command(cfg)}  (or: hf upload {repo_id} {shlex.quote(str(folder))} .)"
        ) from err
    url = getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log.info("export: pushed %s to %s", folder, url)
    return str(url)
