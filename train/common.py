"""What every stage shares: errors, the run folder, stage markers, devices, dtypes, model lookup.

A stage is a function ``run_<stage>(cfg, paths) -> outputs`` wrapped by :func:`stage`. The wrapper
makes it restartable: a finished stage leaves ``<run_dir>/<stage>/DONE`` (JSON: the outputs and a
fingerprint of the config it depends on), written last; a later call returns the recorded outputs
instead of recomputing, after checking the fingerprint still matches the config.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "STAGES",
    "PipelineError",
    "RunPaths",
    "StageInterrupted",
    "config_hash",
    "is_main_process",
    "read_done",
    "read_json",
    "resolve_device",
    "source_model_path",
    "stage",
    "tokenizer_path",
    "torch_dtype",
    "wait_until",
    "write_json",
]

STAGES = ("base", "analyze", "convert", "adapt", "evaluate", "export")

log = logging.getLogger("pod.pipeline")


class PipelineError(Exception):
    """Bad input to the pipeline. ``train/run.py`` prints ``error: <message>`` and exits 2."""


class StageInterrupted(Exception):
    """A stage stopped on purpose before its end (``train.stop_after_steps``); re-running resumes it."""


# ------------------------------------------------------------------------------------------- files


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary sibling, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def config_hash(data: Any, length: int = 12) -> str:
    """Short stable hash of JSON-able data (used to key caches by their settings)."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class RunPaths:
    """The run folder. One sub-folder per stage, each marked complete by a ``DONE`` file."""

    root: Path

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RunPaths:
        return cls(Path(cfg.run_dir).expanduser().resolve())

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"


_RUN_DIR = "<run_dir>"


def read_done(paths: RunPaths, name: str) -> dict[str, Any] | None:
    """The ``DONE`` record of a finished stage, or ``None``.

    Paths inside the run folder are stored as ``<run_dir>/...`` and resolved here, so a run folder
    can be moved or copied.
    """
    done = paths.stage(name) / "DONE"
    if not done.is_file():
        return None
    record = read_json(done)
    record["outputs"] = json.loads(json.dumps(record["outputs"]).replace(_RUN_DIR, str(paths.root)))
    return record


def _write_done(paths: RunPaths, name: str, record: dict[str, Any]) -> None:
    outputs = json.dumps(record["outputs"], default=str).replace(str(paths.root), _RUN_DIR)
    write_json(paths.stage(name) / "DONE", {**record, "outputs": json.loads(outputs)})


# ------------------------------------------------------------------------------------- fingerprints

# The config each stage's output depends on (its own keys plus, through UPSTREAM, everything before
# it). Keys that only change how a stage runs (logging, checkpoint frequency, the simulated
# interruption, pushing) are left out, so changing them never invalidates finished work.
_STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "base": ("base",),
    "analyze": ("model", "analyze", "pod.n_sink", "pod.n_recent", "data.sources", "data.text_field"),
    "convert": ("pod", "model.dtype"),
    "adapt": ("train", "peft", "data", "deepspeed", "seed"),
    "evaluate": ("evaluate", "data.eval_sources", "data.eval_rows"),
    "export": ("export",),
}
_UPSTREAM = {
    "base": None,
    "analyze": "base",
    "convert": "analyze",
    "adapt": "convert",
    "evaluate": "adapt",
    "export": "evaluate",
}
_RUNTIME_ONLY = {
    "base.cache_dir",
    "data.cache_dir",
    "train.stop_after_steps",
    "train.stop_file",
    "train.loss_chunk_size",  # the same loss and gradients, computed in pieces
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.dataloader_num_workers",
    "data.num_proc",
    "export.overwrite",
    "export.push_to_hub",
    "export.repo_id",
    "export.private",
}


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def fingerprint(cfg: DictConfig, name: str, run_dir: Path) -> dict[str, Any]:
    """Flat ``{key: value}`` of the config that stage ``name`` (and the stages before it) depend on.

    Paths inside the run folder are written relative to it, so a copied run folder stays valid.
    """
    out: dict[str, Any] = {}
    current: str | None = name
    while current is not None:
        for key in _STAGE_KEYS[current]:
            value = OmegaConf.select(cfg, key)
            if isinstance(value, DictConfig) or OmegaConf.is_list(value):
                value = OmegaConf.to_container(value, resolve=True)
            _flatten(key, value, out)
        current = _UPSTREAM[current]
    text = json.dumps({k: v for k, v in out.items() if k not in _RUNTIME_ONLY}, sort_keys=True, default=str)
    for spelling in (str(run_dir), str(cfg.run_dir)):
        text = text.replace(spelling, _RUN_DIR)
    return json.loads(text)


def check_fingerprint(recorded: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """Raise :class:`PipelineError` naming the first key whose value differs."""
    if recorded == current:
        return
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key, "<unset>") != current.get(key, "<unset>"):
            raise PipelineError(
                f"{folder} was made with a different config ({key}: {recorded.get(key, '<unset>')!r} -> "
                f"{current.get(key, '<unset>')!r}); use another run_name, or delete {folder} and the stage "
                "folders after it to recompute"
            )


def stage(
    name: str, rerun: Callable[[DictConfig], bool] | None = None
) -> Callable[[Callable[[DictConfig, RunPaths], dict]], Callable[[DictConfig, RunPaths], dict]]:
    """Make ``run_<name>(cfg, paths)`` restartable: reuse a finished output, mark a new one ``DONE``.

    ``rerun(cfg)`` true forces a finished stage to run again (``export.overwrite``).

    A folder without ``DONE`` holds partial work of an interrupted call; ``STARTED`` (written first)
    records the fingerprint it was started with, so a stage that resumes (``adapt``) never continues
    work begun under another config. Stages other than ``adapt`` clear their partial folder.
    """

    def wrap(fn: Callable[[DictConfig, RunPaths], dict]) -> Callable[[DictConfig, RunPaths], dict]:
        @functools.wraps(fn)
        def run(cfg: DictConfig, paths: RunPaths) -> dict:
            folder = paths.stage(name)
            current = fingerprint(cfg, name, paths.root)
            done = read_done(paths, name)
            again = done is not None and rerun is not None and rerun(cfg)
            if done is not None and not again:
                check_fingerprint(done["fingerprint"], current, folder)
                log.info("stage %s: reusing %s (finished %s)", name, folder, done.get("finished"))
                return done["outputs"]
            if not is_main_process():
                return _wait_for(paths, name) if name != "adapt" else fn(cfg, paths)
            started = folder / "STARTED"
            if again:
                log.info("stage %s: running again (asked to by the config)", name)
                (folder / "DONE").unlink()
                started.unlink(missing_ok=True)
            elif started.is_file():
                check_fingerprint(read_json(started)["fingerprint"], current, folder)
                if name != "adapt":
                    shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            if not started.is_file():
                write_json(started, {"fingerprint": current, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
            log.info("stage %s: running -> %s", name, folder)
            t0 = time.perf_counter()
            outputs = fn(cfg, paths)
            seconds = time.perf_counter() - t0
            _write_done(
                paths,
                name,
                {
                    "stage": name,
                    "outputs": outputs,
                    "fingerprint": current,
                    "seconds": round(seconds, 2),
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                },
            )
            log.info("stage %s: done in %.1f s", name, seconds)
            return outputs

        return run

    return wrap


def wait_until(condition: Any, what: str, timeout_s: float | None = None, poll_s: float = 0.5) -> None:
    """Poll ``condition()`` until it is true; :class:`PipelineError` after ``timeout_s`` (None: never)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not condition():
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def _wait_for(paths: RunPaths, name: str, poll_s: float = 5.0) -> dict:
    """Ranks other than 0 wait for rank 0 to finish a single-process stage (as long as it takes)."""
    wait_until(lambda: read_done(paths, name) is not None, f"rank 0 to finish stage {name}", poll_s=poll_s)
    return read_done(paths, name)["outputs"]


# ------------------------------------------------------------------------------------- environment


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return name


def torch_dtype(name: str):
    """``float32`` / ``bfloat16`` / ``float16`` -> the torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def source_model_path(cfg: DictConfig, paths: RunPaths) -> str:
    """The pretrained Llama: ``model.name_or_path``, or the model the ``base`` stage built."""
    if cfg.model.name_or_path is not None:
        return str(cfg.model.name_or_path)
    from train.base import cache_entry

    entry = cache_entry(cfg)
    if not (entry / "DONE").is_file():
        raise PipelineError(
            f"model.name_or_path is null (use the model built by the 'base' stage), but {entry} holds no base "
            "model for these base.* settings: add 'base' to stages, or set model.name_or_path"
        )
    return str(entry / "model")


def tokenizer_path(cfg: DictConfig, paths: RunPaths) -> str:
    """``model.tokenizer``, else the source model's folder / name."""
    return str(cfg.model.tokenizer) if cfg.model.tokenizer is not None else source_model_path(cfg, paths)


def require(paths: RunPaths, name: str, needed_by: str) -> dict[str, Any]:
    """Outputs of a finished earlier stage, or a :class:`PipelineError` saying how to get them."""
    done = read_done(paths, name)
    if done is None:
        raise PipelineError(
            f"stage '{needed_by}' needs the output of stage '{name}', which has not finished in {paths.root}: "
            f"add '{name}' to stages"
        )
    return done["outputs"]
