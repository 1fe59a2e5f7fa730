"""Typed schema of the pipeline config, registered with Hydra's ConfigStore as ``pipeline_schema``.

``conf/config.yaml`` puts the schema first in its defaults list, so every preset, config group and
command-line override is merged into these dataclasses: a misspelt key (``train.lrr=1``) or a
wrong type (``train.max_steps=ten``) fails while Hydra composes, before anything runs. Checks that
need more than one key (a window larger than the sequence, batch arithmetic, DeepSpeed batch sizes)
live in :func:`validate` and raise :class:`~train.common.PipelineError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from train.common import STAGES, PipelineError

__all__ = [
    "AnalyzeConfig",
    "BaseConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExportConfig",
    "LoggingConfig",
    "ModelConfig",
    "PeftConfig",
    "PipelineConfig",
    "PodConfig",
    "TrainConfig",
    "global_batch_tokens",
    "grad_accum_steps",
    "register_schema",
    "total_steps",
    "validate",
    "world_size",
]


@dataclass
class BaseConfig:
    """Stage ``base`` (tiny preset only): a small Llama pretrained here, cached by its settings."""

    cache_dir: str = "${cache_dir}/tiny_base"
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 120
    lr: float = 3e-3
    warmup_steps: int = 12
    stdlib_chars: int = 1_500_000
    passkey_docs: int = 600
    passkey_doc_len: int = 256
    eval_fraction: float = 0.05
    seed: int = 0


@dataclass
class ModelConfig:
    """The pretrained Llama to convert. ``name_or_path: null`` means the model built by ``base``."""

    name_or_path: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"


@dataclass
class PodConfig:
    """PoD settings (METHOD.md sections 1-2)."""

    n_sink: int = 16
    n_recent: int = 4080
    shared_key_init: str = "anchor"
    attn_implementation: str = "sdpa"
    chunk_size: int | None = None


@dataclass
class AnalyzeConfig:
    """Stage ``analyze``: layer similarity on calibration sequences, then the group spec."""

    n_sequences: int = 8
    seq_len: int = "${data.seq_len}"  # type: ignore[assignment]
    n_queries: int = 64
    max_docs: int | None = 2000
    strategy: str = "greedy"
    delta: float = 0.5
    block_size: int = 4
    target_saving: float = 0.3
    per_layer: bool = False


@dataclass
class DataConfig:
    """Training corpus for ``adapt`` (and calibration for ``analyze``), built by ``data.corpus``."""

    sources: list[str] = field(default_factory=list)
    eval_sources: list[str] = field(default_factory=list)
    text_field: str = "text"
    on_error: str = "fail"
    seq_len: int = 32768
    cache_dir: str = "${cache_dir}/corpus"
    num_proc: int = 1
    streaming: bool = False
    max_rows: int | None = None
    eval_rows: int = 16


@dataclass
class DistillConfig:
    """Optional self-distillation: loss = CE + alpha * T^2 * KL(teacher || student)."""

    enabled: bool = False
    alpha: float = 1.0
    temperature: float = 1.0


@dataclass
class TrainConfig:
    """Stage ``adapt``: continued training of the converted model with the HF Trainer."""

    lr: float = 1e-5
    lr_scheduler: str = "cosine"
    warmup_steps: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    micro_batch_size: int = 1
    global_batch_size: int = 1
    max_steps: int | None = None
    train_tokens: float | None = None
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 10
    bf16: bool = False
    gradient_checkpointing: bool = True
    # Cross-entropy over chunks of this many positions, each chunk's logits recomputed in backward:
    # the [batch, seq, vocab] logits never exist at once (Llama-3 at 32K: 39 GiB). 0: the standard loss.
    loss_chunk_size: int = 0
    dataloader_num_workers: int = 0
    stop_after_steps: int | None = None
    # Touch this file to make adapt save a checkpoint at the end of the current step and stop
    # (exit 3); the next run resumes there. The SLURM launcher touches it on USR1.
    stop_file: str = "${run_dir}/STOP"
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class PeftConfig:
    """``method: none`` (full fine-tuning) or ``lora``."""

    method: str = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class EvaluateConfig:
    """Stage ``evaluate``: held-out loss, passkey accuracy and KV bytes for each model."""

    models: list[str] = field(default_factory=lambda: ["dense", "converted", "adapted"])
    batch_size: int = 1
    passkey_samples: int = 6
    passkey_context_len: int = 448
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    kv_seq_len: int = "${data.seq_len}"  # type: ignore[assignment]


@dataclass
class ExportConfig:
    """Stage ``export``: a loadable folder (remote code, tokenizer, groups.json, model card)."""

    dir: str = "${run_dir}/export/model"
    overwrite: bool = False
    dtype: str | None = None
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool = True


@dataclass
class LoggingConfig:
    """W&B through the Trainer's ``report_to``; offline by default, files inside the run folder."""

    wandb: bool = True
    wandb_mode: str = "offline"
    wandb_project: str = "pod"
    wandb_entity: str | None = None


@dataclass
class PipelineConfig:
    """The whole job: which stages run, where the run folder is, and every stage's settings."""

    run_name: str = "run"
    run_dir: str = "outputs/${run_name}"
    cache_dir: str = "cache"
    seed: int = 0
    device: str = "auto"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    base: BaseConfig = field(default_factory=BaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pod: PodConfig = field(default_factory=PodConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: dict[str, Any] | None = None
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_schema() -> None:
    """Register :class:`PipelineConfig` as ``pipeline_schema`` (idempotent)."""
    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


# --------------------------------------------------------------------------------- derived values

_CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "pod.shared_key_init": ("anchor", "mean"),
    "pod.attn_implementation": ("sdpa", "eager", "flex"),
    "analyze.strategy": ("greedy", "fixed", "target"),
    "data.on_error": ("fail", "skip"),
    "peft.method": ("none", "lora"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "device": ("auto", "cpu", "cuda"),
}

_EVAL_MODELS = ("dense", "converted", "adapted")


def world_size() -> int:
    """Processes of this job (``WORLD_SIZE`` set by torchrun / the deepspeed launcher; 1 otherwise)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(cfg: DictConfig, world: int | None = None) -> int:
    """Gradient accumulation so that micro_batch x accum x world == global_batch_size."""
    world = world_size() if world is None else world
    micro, total = cfg.train.micro_batch_size, cfg.train.global_batch_size
    per_step = micro * world
    if total % per_step:
        raise PipelineError(
            f"train.global_batch_size={total} is not a multiple of train.micro_batch_size x world size = "
            f"{micro} x {world}: pick a global batch divisible by {per_step}"
        )
    return total // per_step


def global_batch_tokens(cfg: DictConfig) -> int:
    """Tokens per optimizer step: global batch (sequences) x sequence length."""
    return int(cfg.train.global_batch_size) * int(cfg.data.seq_len)


def total_steps(cfg: DictConfig) -> int:
    """``train.max_steps``, or ``ceil(train.train_tokens / tokens per step)`` when max_steps is null."""
    if cfg.train.max_steps is not None:
        return int(cfg.train.max_steps)
    if cfg.train.train_tokens is None:
        raise PipelineError("set train.max_steps or train.train_tokens (the number of tokens to adapt on)")
    per_step = global_batch_tokens(cfg)
    return max(1, -(-int(cfg.train.train_tokens) // per_step))


def _check_deepspeed(cfg: DictConfig, world: int) -> None:
    """The DeepSpeed dict's explicit batch sizes must agree with the train section and world size."""
    ds = cfg.deepspeed
    if ds is None:
        return
    ds = OmegaConf.to_container(ds, resolve=True) if isinstance(ds, DictConfig) else dict(ds)
    accum = grad_accum_steps(cfg, world)
    micro = cfg.train.micro_batch_size
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
    }
    for key, want in expected.items():
        value = ds.get(key, "auto")
        if value == "auto":
            continue
        if not isinstance(value, int) or value != want:
            raise PipelineError(
                f"deepspeed.{key}={value!r} does not match the run: train_batch_size must equal "
                f"micro_batch x grad_accum x world_size = {micro} x {accum} x {world} = {micro * accum * world} "
                f"(train.micro_batch_size={micro}, train.global_batch_size={cfg.train.global_batch_size}, "
                f"WORLD_SIZE={world}); set it to {want} or 'auto'"
            )
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise PipelineError(f"deepspeed.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def validate(cfg: DictConfig) -> None:
    """Cross-field checks of a composed config; raises :class:`PipelineError` with the key to fix."""
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise PipelineError(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"stages: unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    bad_models = [m for m in cfg.evaluate.models if m not in _EVAL_MODELS]
    if bad_models:
        raise PipelineError(f"evaluate.models: unknown {bad_models}; choose from {list(_EVAL_MODELS)}")
    if "base" in cfg.stages and cfg.model.name_or_path is not None:
        raise PipelineError(
            f"stage 'base' builds the tiny model, but model.name_or_path={cfg.model.name_or_path!r} is set: "
            "drop 'base' from stages, or set model.name_or_path=null"
        )
    window = cfg.pod.n_sink + cfg.pod.n_recent
    if window >= cfg.data.seq_len:
        raise PipelineError(
            f"the proximal window pod.n_sink + pod.n_recent = {cfg.pod.n_sink} + {cfg.pod.n_recent} = {window} "
            f"is not smaller than the training sequence data.seq_len={cfg.data.seq_len}: no token would be "
            "distant, so PoD would change nothing; lower pod.n_recent or raise data.seq_len"
        )
    if window + cfg.analyze.n_queries > cfg.analyze.seq_len:
        raise PipelineError(
            f"analyze.seq_len={cfg.analyze.seq_len} must be at least pod.n_sink + pod.n_recent + analyze.n_queries "
            f"= {window + cfg.analyze.n_queries} so that the last queries have distant keys"
        )
    for key in (
        "train.micro_batch_size",
        "train.global_batch_size",
        "train.save_steps",
        "train.logging_steps",
    ):
        if OmegaConf.select(cfg, key) < 1:
            raise PipelineError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.train.loss_chunk_size < 0:
        raise PipelineError(
            f"train.loss_chunk_size must be >= 0 (0: the standard loss), got {cfg.train.loss_chunk_size}"
        )
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise PipelineError(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    world = world_size()
    grad_accum_steps(cfg, world)
    if "adapt" in cfg.stages:
        total_steps(cfg)
    _check_deepspeed(cfg, world)
    if cfg.export.push_to_hub and not cfg.export.repo_id:
        raise PipelineError("export.push_to_hub=true needs export.repo_id=<org>/<name>")
    if cfg.evaluate.passkey_context_len >= cfg.data.seq_len and "evaluate" in cfg.stages:
        raise PipelineError(
            f"evaluate.passkey_context_len={cfg.evaluate.passkey_context_len} must be below data.seq_len="
            f"{cfg.data.seq_len} (room for the answer)"
        )
