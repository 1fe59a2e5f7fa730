"""Stage ``adapt``: continued training of the converted PoD model with the HF Trainer.

Full fine-tuning or LoRA (peft), optional DeepSpeed (``TrainingArguments(deepspeed=<dict>)``),
activation checkpointing, a cosine schedule, checkpoints every ``train.save_steps`` and exact resume
from the last one, W&B logging (offline by default, files in the run folder), and optional
self-distillation whose teacher is the same model with PoD (and the LoRA adapters) switched off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from train.common import (
    PipelineError,
    RunPaths,
    StageInterrupted,
    is_main_process,
    read_done,
    require,
    resolve_device,
    stage,
    torch_dtype,
    wait_until,
    write_json,
)
from train.config import global_batch_tokens, grad_accum_steps, total_steps

__all__ = ["PodTrainer", "load_adapted", "run_adapt", "setup_wandb_env", "teacher_mode"]

log = logging.getLogger("pod.pipeline")


# ------------------------------------------------------------------------------------ distillation


@contextlib.contextmanager
def teacher_mode(model: torch.nn.Module) -> Iterator[None]:
    """The dense original inside the block: PoD off (``pod_disabled``) and LoRA adapters off.

    The teacher is the student's own weights, so self-distillation needs no second model copy.
    """
    with contextlib.ExitStack() as stack:
        base = model
        if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
            stack.enter_context(model.disable_adapter())
            base = model.get_base_model()
        if not hasattr(base, "pod_disabled"):
            raise PipelineError(
                f"{type(base).__name__} has no pod_disabled(): distillation needs a PoD model"
            )
        stack.enter_context(base.pod_disabled())
        yield


class PodTrainer(Trainer):
    """The HF Trainer plus self-distillation and a tokens-per-second figure in the logs.

    With ``distill.enabled`` the loss is ``CE + alpha * T^2 * KL(teacher || student)`` over the
    predicted tokens; both terms are normalised like the Trainer's own loss (by the number of label
    tokens in the whole accumulated batch when it is known), so gradient accumulation is exact.
    """

    def __init__(
        self, *args: Any, distill: DictConfig | None = None, tokens_per_step: int = 0, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.distill = distill if distill is not None and distill.enabled else None
        self.tokens_per_step = tokens_per_step
        self._parts: dict[str, list[float]] = {"ce": [], "kl": []}
        self._last_log: tuple[int, float] | None = None
        if self.distill is not None:
            self.loss_is_scaled_for_ga = True

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if self.distill is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        features = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**features, use_cache=False)
        with torch.no_grad(), teacher_mode(self.accelerator.unwrap_model(model)):
            teacher_logits = model(**features, use_cache=False).logits
        shift_labels = labels[:, 1:]
        valid = shift_labels != -100
        student = outputs.logits[:, :-1][valid].float()
        teacher = teacher_logits[:, :-1][valid].float()
        temperature = float(self.distill.temperature)
        ce_sum = F.cross_entropy(student, shift_labels[valid], reduction="sum")
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl_sum = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * temperature**2
        if num_items_in_batch is not None:
            denom = torch.as_tensor(num_items_in_batch, device=ce_sum.device, dtype=ce_sum.dtype)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        else:
            denom = valid.sum().clamp(min=1) * self.current_gradient_accumulation_steps
            scale = 1
        loss = (ce_sum + float(self.distill.alpha) * kl_sum) / denom * scale
        n_tokens = max(1, int(valid.sum()))
        self._parts["ce"].append(ce_sum.item() / n_tokens)
        self._parts["kl"].append(kl_sum.item() / n_tokens)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            if self._last_log is not None and step > self._last_log[0]:
                logs["tokens_per_second"] = round(
                    (step - self._last_log[0]) * self.tokens_per_step / (now - self._last_log[1]), 1
                )
            self._last_log = (step, now)
            logs["tokens_seen"] = step * self.tokens_per_step
            for name, values in self._parts.items():
                if values:
                    logs[f"distill_{name}"] = sum(values) / len(values)
                    values.clear()
        super().log(logs, start_time)


class StopAfterSteps(TrainerCallback):
    """Stop (with a checkpoint) after ``n`` optimizer steps: simulates an interrupted job."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
            control.should_save = True
        return control


class StopFile(TrainerCallback):
    """Save a checkpoint and stop at the end of the step during which ``path`` appeared.

    Every rank looks for the file and the ranks agree through one all-reduce per optimizer step,
    so all of them save at the same step (a ZeRO checkpoint is written by every rank together)
    even when a shared file system shows the file to some ranks a step later than to others.
    """

    def __init__(self, path: Path):
        self.path = path
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        seen = self.path.exists()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(seen)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            seen = bool(flag.item())
        if seen:
            log.info("adapt: %s appeared: saving checkpoint-%d and stopping", self.path, state.global_step)
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class PipelineWandb(TrainerCallback):
    """Adds the resolved pipeline config and the grouping plots to the W&B run the Trainer opened."""

    def __init__(self, config: dict[str, Any], images: list[str]):
        self.config = config
        self.images = images

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if wandb.run is None or not state.is_world_process_zero:
            return
        wandb.config.update({"pipeline": self.config}, allow_val_change=True)
        images = {f"grouping/{Path(p).stem}": wandb.Image(p) for p in self.images if Path(p).is_file()}
        if images:
            wandb.log(images)


class TrainLogFile(TrainerCallback):
    """Appends every Trainer log record to ``logs/train_log.jsonl`` in the run folder."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            import json

            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# ------------------------------------------------------------------------------------ environment


def setup_wandb_env(cfg: DictConfig, paths: RunPaths) -> str:
    """Point W&B at the run folder (offline unless ``logging.wandb_mode=online``); return the run id.

    The run id is kept in ``wandb/run_id`` so a resumed job and the evaluate stage log to the same run.
    """
    paths.wandb.mkdir(parents=True, exist_ok=True)
    id_file = paths.wandb / "run_id"
    if not id_file.is_file():
        id_file.write_text(uuid.uuid4().hex[:8] + "\n")
    run_id = id_file.read_text().strip()
    os.environ["WANDB_MODE"] = cfg.logging.wandb_mode
    os.environ["WANDB_DIR"] = str(paths.wandb)
    os.environ["WANDB_PROJECT"] = cfg.logging.wandb_project
    if cfg.logging.wandb_entity:
        os.environ["WANDB_ENTITY"] = cfg.logging.wandb_entity
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ["WANDB_RESUME"] = "allow"
    os.environ.setdefault("WANDB_CONSOLE", "off")
    return run_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_env(cfg: DictConfig) -> None:
    """DeepSpeed without a launcher needs the rendezvous variables; on CPU, the cpu accelerator."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
        )
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(cfg.cache_dir).expanduser().resolve() / "torch_extensions")
    )


# ------------------------------------------------------------------------------------------ models


def _load_pod(model_dir: str, dtype: torch.dtype) -> Any:
    from pod import PodLlamaForCausalLM

    return PodLlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _lora(model: Any, cfg: DictConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    modules_to_save = list(cfg.peft.modules_to_save)
    if cfg.pod.shared_key_init == "mean" and "shared_k_proj" not in modules_to_save:
        # The per-block shared key projections are PoD's own weights: train them fully.
        modules_to_save.append("shared_k_proj")
    lora = LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=list(cfg.peft.target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("adapt: LoRA r=%d, %.2fM trainable parameters", cfg.peft.r, trainable / 1e6)
    return model


def load_adapted(cfg: DictConfig, paths: RunPaths, dtype: torch.dtype | None = None) -> Any:
    """The adapted PoD model as a plain ``PodLlamaForCausalLM`` (LoRA merged with ``merge_and_unload``)."""
    done = require(paths, "adapt", "evaluate/export")
    dtype = dtype or torch_dtype(cfg.model.dtype)
    if not done["adapter"]:
        return _load_pod(done["model_dir"], dtype)
    from peft import PeftModel

    base = _load_pod(require(paths, "convert", "adapt")["model_dir"], dtype)
    return PeftModel.from_pretrained(base, done["model_dir"]).merge_and_unload()


# -------------------------------------------------------------------------------------------- stage


@stage("adapt")
def run_adapt(cfg: DictConfig, paths: RunPaths) -> dict[str, Any]:
    """Train the converted model; resume from ``adapt/checkpoints/`` when a previous call stopped."""
    from train.rows import PackedCollator, load_tokenizer, train_eval_rows

    converted = require(paths, "convert", "adapt")
    out = paths.stage("adapt")
    tokenizer = load_tokenizer(cfg, paths)
    train_rows, _, data_summary = train_eval_rows(cfg, tokenizer)
    steps = total_steps(cfg)
    accum = grad_accum_steps(cfg)
    tokens_per_step = global_batch_tokens(cfg)

    model = _load_pod(converted["model_dir"], torch_dtype(cfg.model.dtype))
    model.config.use_cache = False
    pod_config = model.config  # shared with the LoRA wrapper's base model
    pod_config.loss_chunk_size = cfg.train.loss_chunk_size
    if cfg.train.loss_chunk_size:
        log.info(
            "adapt: cross-entropy in chunks of %d positions (train.loss_chunk_size)",
            cfg.train.loss_chunk_size,
        )
    if cfg.peft.method == "lora":
        model = _lora(model, cfg)

    resume = _last_complete_checkpoint(out / "checkpoints")
    deepspeed = None
    if cfg.deepspeed is not None:
        deepspeed = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        _deepspeed_env(cfg)
        if resume is not None:
            _universal_if_resharded(Path(resume), deepspeed)
    report_to: list[str] = []
    images: list[str] = []
    if cfg.logging.wandb:
        if is_main_process():  # only rank 0 reports; one writer of wandb/run_id
            setup_wandb_env(cfg, paths)
        report_to = ["wandb"]
        images = (read_done(paths, "analyze") or {}).get("outputs", {}).get("plots", [])

    device = resolve_device(cfg.device)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        run_name=cfg.run_name,
        max_steps=steps,
        per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        optim=cfg.train.optim,
        bf16=cfg.train.bf16,
        activation_checkpointing=cfg.train.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if cfg.train.gradient_checkpointing
        else None,
        logging_steps=cfg.train.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        report_to=report_to or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        deepspeed=deepspeed,
        use_cpu=device == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.train.dataloader_num_workers,
        save_only_model=False,
    )
    callbacks: list[TrainerCallback] = [TrainLogFile(paths.logs / "train_log.jsonl")]
    if cfg.logging.wandb:
        callbacks.append(PipelineWandb(OmegaConf.to_container(cfg, resolve=True), images))
    if cfg.train.stop_after_steps is not None:
        callbacks.append(StopAfterSteps(cfg.train.stop_after_steps))
    stop_file = StopFile(Path(cfg.train.stop_file))
    if stop_file.path.exists():
        log.warning(
            "adapt: %s exists, so adapt will save and stop after its first step; delete it to train through",
            stop_file.path,
        )
    callbacks.append(stop_file)
    trainer = PodTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        data_collator=PackedCollator(),
        callbacks=callbacks,
        distill=cfg.train.distill,
        tokens_per_step=tokens_per_step,
    )
    log.info(
        "adapt: %d steps x %d tokens (micro %d x accum %d x world %d sequences of %d)%s",
        steps,
        tokens_per_step,
        cfg.train.micro_batch_size,
        accum,
        args.world_size,
        cfg.data.seq_len,
        f", resuming from {resume}" if resume else "",
    )
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0
    if stop_file.stopped_at is not None and is_main_process():
        stop_file.path.unlink(missing_ok=True)  # consumed: the run that resumes must not stop at once
    if trainer.state.global_step < steps:
        _finish_wandb()
        where = f"checkpoints are in {out / 'checkpoints'}"
        if stop_file.stopped_at is not None:
            raise StageInterrupted(
                f"adapt saved checkpoint-{stop_file.stopped_at} and stopped at step {stop_file.stopped_at} of "
                f"{steps} because {stop_file.path} appeared (it is now deleted); {where}: run the same "
                "command to resume"
            )
        raise StageInterrupted(
            f"adapt stopped after step {trainer.state.global_step} of {steps} (train.stop_after_steps="
            f"{cfg.train.stop_after_steps}); {where}: run the same command without train.stop_after_steps "
            "to resume"
        )

    pod_config.loss_chunk_size = 0  # a training setting: the saved model computes the standard loss
    trainer.save_model(str(out / "model"))  # collective under ZeRO-3: every rank calls it
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out / "model")
        write_json(out / "log_history.json", history)
        _plot_loss(losses, out / "loss.png")
    _finish_wandb()
    speeds = [h["tokens_per_second"] for h in history if "tokens_per_second" in h]
    return {
        "model_dir": str(out / "model"),
        "adapter": cfg.peft.method == "lora",
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "resumed_from": resume,
        "loss_start": _mean_loss(losses[: max(1, len(losses) // 4)]),
        "loss_end": _mean_loss(losses[-max(1, len(losses) // 4) :]),
        "train_loss": result.training_loss,
        "seconds_this_call": round(seconds, 1),
        "tokens_per_second": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "data": data_summary,
        "plots": [str(out / "loss.png")] if losses else [],
    }


def _last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing (its ``trainer_state.json`` is written last).

    A process killed while saving leaves a partial folder; resuming from it would fail or, worse,
    load half a state. It is skipped (and kept, for a post-mortem) with a warning.
    """
    if not folder.is_dir():
        return None
    while (last := get_last_checkpoint(str(folder))) is not None:
        if (Path(last) / "trainer_state.json").is_file():
            return last
        log.warning(
            "adapt: %s is incomplete (no trainer_state.json; the run died while saving): skipping it", last
        )
        hidden = Path(last).with_name(f"incomplete-{Path(last).name}-{uuid.uuid4().hex[:6]}")
        if is_main_process():
            Path(last).rename(hidden)
        else:  # rank 0 renames it; wait so that every rank picks the same checkpoint
            wait_until(
                lambda last=last: not Path(last).exists(), f"rank 0 to set {last} aside", timeout_s=1800
            )
    return None


def _universal_if_resharded(checkpoint: Path, deepspeed: dict[str, Any]) -> None:
    """Let a DeepSpeed checkpoint written by another number of processes resume here.

    ZeRO partitions the optimizer state (and at stage 3 the parameters) by data-parallel rank, and
    DeepSpeed refuses partitions written under another world size. A *universal* checkpoint does not
    depend on it: rank 0 converts the checkpoint once (``deepspeed.checkpoint.ds_to_universal``, next
    to the original, which is kept), and every rank loads it with ``checkpoint.load_universal``.
    """
    import subprocess

    tag = (checkpoint / "latest").read_text().strip() if (checkpoint / "latest").is_file() else None
    if tag is None:
        return  # not a DeepSpeed checkpoint: the Trainer reads it as is
    written_by = len(list((checkpoint / tag).glob("*optim_states.pt")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if written_by in (0, world):
        return
    done, failed = checkpoint / "latest_universal", checkpoint / "universal_failed.txt"
    started = time.time()
    if is_main_process() and not done.is_file():
        log.info(
            "adapt: %s was written by %d processes and this run has %d: converting it to a universal checkpoint",
            checkpoint, written_by, world,
        )  # fmt: skip
        failed.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
            "--input_folder", str(checkpoint / tag), "--output_folder", str(checkpoint / f"{tag}_universal"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not done.is_file():
            failed.write_text(result.stdout[-5000:] + result.stderr[-5000:])
            raise PipelineError(
                f"adapt: converting {checkpoint / tag} (written by {written_by} processes) for {world} processes "
                f"failed; the output of {' '.join(command[1:4])} is in {failed}. Resume with {written_by} processes, "
                "or delete the checkpoint to start over"
            )

    def failed_now() -> bool:  # not a failure file left by an earlier attempt
        return failed.is_file() and failed.stat().st_mtime >= started - 1

    wait_until(
        lambda: done.is_file() or failed_now(),
        f"rank 0 to convert {checkpoint} to a universal checkpoint",
        timeout_s=1800,
    )
    if failed_now():
        raise PipelineError(
            f"adapt: rank 0 could not convert {checkpoint} to a universal checkpoint: see {failed}"
        )
    deepspeed.setdefault("checkpoint", {})["load_universal"] = True


def _mean_loss(losses: list[tuple[int, float]]) -> float | None:
    """Mean of logged losses (the start / end quarter of the run: single batches are noisy)."""
    return sum(v for _, v in losses) / len(losses) if losses else None


def _finish_wandb() -> None:
    """Close the W&B run the Trainer opened (the evaluate stage reopens it by id)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _plot_loss(losses: list[tuple[int, float]], path: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title("adapt: training loss")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
