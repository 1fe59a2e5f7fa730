"""The run's ``metrics.json`` (every finished stage's record) and the closing summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from train.common import STAGES, RunPaths, read_done, write_json
from train.export import results_table

__all__ = ["collect_metrics", "summary_text", "write_run_metrics"]


def collect_metrics(paths: RunPaths) -> dict[str, Any]:
    """One dict with each finished stage's outputs, seconds and finish time."""
    stages: dict[str, Any] = {}
    for name in STAGES:
        done = read_done(paths, name)
        if done is not None:
            stages[name] = {
                "seconds": done.get("seconds"),
                "finished": done.get("finished"),
                **done["outputs"],
            }
    for record in stages.values():
        record.pop("losses", None)
    if "base" in stages:
        stages["base"].get("report", {}).pop("losses", None)
    return {"run_dir": str(paths.root), "stages": stages, "evaluation": stages.get("evaluate")}


def write_run_metrics(paths: RunPaths) -> dict[str, Any]:
    """Write ``<run_dir>/metrics.json`` and return it."""
    metrics = collect_metrics(paths)
    write_json(paths.metrics, metrics)
    return metrics


def _rel(path: str | Path, root: Path) -> str:
    path = Path(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def summary_text(cfg: DictConfig, paths: RunPaths, metrics: dict[str, Any], seconds: float) -> str:
    """Where everything is, and the dense / converted / adapted table."""
    stages = metrics["stages"]
    root = paths.root
    lines = [f"PoD pipeline: {cfg.run_name} finished in {seconds:.0f} s ({', '.join(cfg.stages)})", ""]
    rows = [("run folder", root), ("config", paths.config), ("logs", paths.logs), ("metrics", paths.metrics)]
    if "base" in stages:
        rows.append(("base model", stages["base"]["model_dir"]))
    if "analyze" in stages:
        rows.append(("group spec", stages["analyze"]["groups"]))
        rows += [("plot", p) for p in stages["analyze"].get("plots", [])]
    if "convert" in stages:
        rows.append(("converted", stages["convert"]["model_dir"]))
    if "adapt" in stages:
        rows.append(("adapted", stages["adapt"]["model_dir"]))
        rows += [("plot", p) for p in stages["adapt"].get("plots", [])]
    if paths.wandb.is_dir():
        rows.append((f"W&B ({cfg.logging.wandb_mode})", paths.wandb))
    if "export" in stages:
        rows.append(("export", stages["export"]["dir"]))
    width = max(len(k) for k, _ in rows)
    lines += [f"  {key:<{width}}  {_rel(value, root)}" for key, value in rows]
    if "adapt" in stages:
        a = stages["adapt"]
        lines += [
            "",
            f"adapt: {a['steps']} steps, {a['tokens']:,} tokens, training loss {a['loss_start']:.4f} -> {a['loss_end']:.4f} (first / last quarter)",
        ]
    if stages.get("evaluate"):
        lines += ["", results_table(stages["evaluate"]).rstrip()]
    if paths.wandb.is_dir() and cfg.logging.wandb_mode == "offline":
        lines += ["", f"sync W&B later with: wandb sync {_rel(paths.wandb, root)}/wandb/offline-run-*"]
    return "\n".join(lines)
