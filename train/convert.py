"""Stage ``convert``: the pretrained Llama + the group spec -> a PoD Llama (same weights)."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from omegaconf import DictConfig

from train.common import PipelineError, RunPaths, require, stage, torch_dtype

__all__ = ["run_convert"]

log = logging.getLogger("pod.pipeline")


@stage("convert")
def run_convert(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Convert with ``pod.convert_llama`` and save to ``<run_dir>/convert/model`` (with the tokenizer)."""
    import pod
    from train.analyze import load_source_llama
    from train.rows import load_tokenizer

    groups = require(paths, "analyze", "convert")["groups"]
    out = paths.stage("convert")
    source = load_source_llama(cfg, paths)
    try:
        model = pod.convert_llama(
            source,
            pod.GroupSpec.load(groups),
            n_sink=cfg.pod.n_sink,
            n_recent=cfg.pod.n_recent,
            shared_key_init=cfg.pod.shared_key_init,
            dtype=torch_dtype(cfg.model.dtype),
            attn_implementation=cfg.pod.attn_implementation,
            chunk_size=cfg.pod.chunk_size,
        )
    except (pod.ConversionError, pod.GroupSpecError) as err:
        raise PipelineError(f"convert: {err}") from err
    del source
    model.save_pretrained(out / "model")
    load_tokenizer(cfg, paths).save_pretrained(out / "model")
    shutil.copyfile(groups, out / "groups.json")
    params = sum(p.numel() for p in model.parameters())
    log.info("convert: PoD Llama with %.2fM parameters -> %s", params / 1e6, out / "model")
    return {"model_dir": str(out / "model"), "groups": str(out / "groups.json"), "params": params}
