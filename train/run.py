"""The PoD pipeline job: ``python train/run.py [conf=<preset>] [stages=[...]] [key=value ...]``.

Runs the chosen stages in order — base (tiny only), analyze, convert, adapt, evaluate, export —
into one run folder (``run_dir``, default ``outputs/<run_name>``). A finished stage is reused, so
running the same command again continues where an interrupted job stopped. Bad input prints
``error: <message>`` on stderr and exits with status 2, before anything in the run folder changes.
See docs/pipeline.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python train/run.py` puts train/ first on sys.path, where stage modules (evaluate, export, ...)
# would shadow installed packages of the same name; the repository root belongs there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train.common import (  # noqa: E402
    STAGES,
    PipelineError,
    RunPaths,
    StageInterrupted,
    check_fingerprint,
    fingerprint,
    is_main_process,
    read_done,
    source_model_path,
)
from train.config import register_schema, validate  # noqa: E402

__all__ = ["main", "preflight", "run_pipeline"]

log = logging.getLogger("pod.pipeline")
PRESETS = ROOT / "conf" / "conf"

register_schema()


def _stage_functions() -> dict[str, Any]:
    from train.adapt import run_adapt
    from train.analyze import run_analyze
    from train.base import run_base
    from train.convert import run_convert
    from train.evaluate import run_evaluate
    from train.export import run_export

    return {
        "base": run_base,
        "analyze": run_analyze,
        "convert": run_convert,
        "adapt": run_adapt,
        "evaluate": run_evaluate,
        "export": run_export,
    }


def _pending(cfg: DictConfig, paths: RunPaths, name: str) -> bool:
    """The stage is asked for and has no finished output yet."""
    return name in cfg.stages and read_done(paths, name) is None


def _check_model_path(cfg: DictConfig) -> None:
    """A missing path or a model that is not a Llama fails here, before any work."""
    from transformers import AutoConfig

    path = cfg.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = (
            "is not a model folder (no readable config.json)"
            if Path(path).is_dir()
            else (
                "is not a local folder, and as a Hub model name it could not be loaded (offline? set it to a local "
                "checkpoint)"
            )
        )
        raise PipelineError(f"model.name_or_path={path!r} {where}: {type(err).__name__}") from err
    if config.model_type != "llama":
        raise PipelineError(
            f"model.name_or_path={path!r}: model_type is {config.model_type!r}; PoD converts Llama-architecture "
            "models (model_type 'llama')"
        )


def preflight(cfg: DictConfig, paths: RunPaths) -> None:
    """Every check that needs no heavy work, run before the run folder is touched.

    Model path and type, data sources, finished stages made with another config, an export folder
    that would be overwritten.
    """
    needs_source = (
        _pending(cfg, paths, "analyze")
        or _pending(cfg, paths, "convert")
        or (_pending(cfg, paths, "evaluate") and "dense" in cfg.evaluate.models)
    )
    if needs_source:
        if cfg.model.name_or_path is not None:
            _check_model_path(cfg)
        elif "base" not in cfg.stages:
            source_model_path(cfg, paths)
    if any(_pending(cfg, paths, s) for s in ("analyze", "adapt", "evaluate")):
        from train.rows import check_sources

        check_sources(cfg, paths, produced_here="base" in cfg.stages)
    # Finished stages that will be reused, asked for or upstream of one that is, must match the config.
    last = max(STAGES.index(name) for name in cfg.stages) if cfg.stages else -1
    for name in STAGES[: last + 1]:
        done = read_done(paths, name)
        rerun = name == "export" and cfg.export.overwrite
        if done is not None and not rerun:
            check_fingerprint(done["fingerprint"], fingerprint(cfg, name, paths.root), paths.stage(name))
    if "export" in cfg.stages and not cfg.export.overwrite and read_done(paths, "export") is None:
        target = Path(cfg.export.dir).expanduser().resolve()
        if target.exists():
            raise PipelineError(
                f"export.dir={target} already exists; set export.overwrite=true to replace it, or choose another export.dir"
            )


def _setup_logging(paths: RunPaths) -> list[tuple[logging.Logger, logging.Handler]]:
    """Pipeline messages to stdout and ``logs/pipeline.log`` (transformers' warnings to the file too)."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(paths.logs / "pipeline.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("[pod] %(message)s"))
    log.setLevel(logging.INFO)
    log.propagate = False
    added = [(log, file_handler), (log, console), (logging.getLogger("transformers"), file_handler)]
    for logger, handler in added:
        logger.addHandler(handler)
    return added


def run_pipeline(cfg: DictConfig, command: str | None = None) -> dict[str, Any]:
    """Validate, check, then run the chosen stages; returns the run's metrics.

    Raises :class:`PipelineError` for bad input (nothing in the run folder is changed by then),
    :class:`StageInterrupted` when ``train.stop_after_steps`` stops ``adapt`` early.
    """
    from train.export import push_to_hub
    from train.report import summary_text, write_run_metrics

    t0 = time.perf_counter()
    validate(cfg)
    paths = RunPaths.from_config(cfg)
    preflight(cfg, paths)
    handlers = []
    if is_main_process():
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        handlers = _setup_logging(paths)
        with (paths.logs / "commands.txt").open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command or '(called from Python)'}\n")
    try:
        functions = _stage_functions()
        for name in STAGES:
            if name in cfg.stages:
                functions[name](cfg, paths)
        if not is_main_process():
            return {}
        if "export" in cfg.stages and cfg.export.push_to_hub:
            push_to_hub(cfg, read_done(paths, "export")["outputs"]["dir"])
        metrics = write_run_metrics(paths)
        print("\n" + summary_text(cfg, paths, metrics, time.perf_counter() - t0), flush=True)
        return metrics
    finally:
        for logger, handler in handlers:
            logger.removeHandler(handler)
            handler.close()


def _check_preset_argument(argv: list[str]) -> None:
    """Hydra's own message for an unknown preset is long; say it in one line instead."""
    for arg in argv:
        if arg.startswith("conf="):
            name = arg.split("=", 1)[1]
            if not (PRESETS / f"{name}.yaml").is_file():
                available = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
                print(f"error: unknown preset conf={name}; available presets: {available}", file=sys.stderr)
                sys.exit(2)


def _strip_launcher_arguments(argv: list[str]) -> list[str]:
    """The deepspeed launcher adds ``--local_rank=N``, which Hydra would reject: move it to the env."""
    kept = []
    for arg in argv:
        if arg.startswith("--local_rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        else:
            kept.append(arg)
    return kept


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input -> ``error: ...`` on stderr, exit 2; interrupted -> exit 3."""
    from train.export import PushError

    command = " ".join(["python", "train/run.py", *sys.argv[1:]])
    try:
        run_pipeline(cfg, command)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except StageInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        sys.exit(3)
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.argv = _strip_launcher_arguments(sys.argv)
    _check_preset_argument(sys.argv[1:])
    main()
