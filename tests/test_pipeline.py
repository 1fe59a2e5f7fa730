"""The Hydra pipeline (train/): presets, a tiny end-to-end run, exact resume, DeepSpeed, bad input.

The end-to-end run (a module fixture) runs ``python train/run.py`` in a subprocess with the tiny
preset shrunk by overrides; the resume, export and DeepSpeed tests reuse its converted model by
copying its run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "train" / "run.py")]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "conf").glob("*.yaml"))

# The tiny preset shrunk for a test: ~30 s of base pretraining, 6 adapt steps at 256 tokens.
SHRINK = [
    "base.steps=30",
    "base.stdlib_chars=300000",
    "base.passkey_docs=120",
    "base.passkey_doc_len=200",
    "base.vocab_size=1024",
    "data.seq_len=256",
    "data.eval_rows=4",
    "pod.n_recent=60",
    "analyze.n_sequences=4",
    "analyze.n_queries=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.max_steps=6",
    "train.save_steps=3",
    "train.logging_steps=1",
    "evaluate.passkey_samples=2",
    "evaluate.passkey_context_len=200",
]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))
    }
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _run(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        RUN + args, capture_output=True, text=True, cwd=ROOT, env=_env(**env), timeout=timeout
    )


def _compose(overrides: list[str]):
    from train.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _copy_run(src: Path, dst: Path, stages: tuple[str, ...] = ("base", "analyze", "convert")) -> Path:
    dst.mkdir(parents=True)
    for name in stages:
        shutil.copytree(src / name, dst / name)
    return dst


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, monkeypatch):
    from omegaconf import OmegaConf

    from train.config import global_batch_tokens, grad_accum_steps, total_steps, validate

    world = "1" if preset in ("tiny", "llama3_8b_lora") else "8"
    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = _compose([f"conf={preset}"])
    validate(cfg)
    accum = grad_accum_steps(cfg)
    assert cfg.train.micro_batch_size * accum * int(world) == cfg.train.global_batch_size
    if cfg.deepspeed is not None:
        from deepspeed.runtime.config import DeepSpeedConfig

        ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
        # What the HF Trainer puts in place of "auto" for a world of one process.
        filled = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.global_batch_size // cfg.train.micro_batch_size,
            "train_batch_size": cfg.train.global_batch_size,
            "gradient_clipping": cfg.train.max_grad_norm,
        }
        ds.update(filled)
        ds["bf16"] = {"enabled": bool(cfg.train.bf16)}
        ds["fp16"] = {"enabled": False}
        ds["zero_optimization"] = {k: v for k, v in ds["zero_optimization"].items() if v != "auto"}
        parsed = DeepSpeedConfig(ds)
        assert (
            parsed.train_batch_size
            == parsed.train_micro_batch_size_per_gpu * parsed.gradient_accumulation_steps
        )
        assert parsed.zero_optimization_stage in (2, 3)
    if preset == "llama3_8b":
        assert (cfg.pod.n_sink, cfg.pod.n_recent, cfg.analyze.delta) == (16, 4080, 0.5)
        assert (cfg.train.lr, cfg.train.lr_scheduler, cfg.train.bf16) == (1e-5, "cosine", True)
        assert global_batch_tokens(cfg) == 128 * 32768 == 4_194_304
        assert total_steps(cfg) == 1193  # ceil(5e9 / 4,194,304)
        assert cfg.deepspeed.zero_optimization.stage == 3 and cfg.peft.method == "none"
        assert cfg.pod.attn_implementation == "flex" and cfg.train.gradient_checkpointing
    if preset == "llama3_1_8b":
        assert cfg.data.seq_len == 131072 and global_batch_tokens(cfg) == 4_194_304
    if preset == "llama3_8b_lora":
        assert cfg.peft.method == "lora" and cfg.deepspeed is None


def test_cli_composes_a_preset_verbatim():
    result = _run(
        ["conf=llama3_8b", "train.lr=2e-5", "pod.n_recent=2048", "stages=[analyze,convert]", "--cfg", "job"]
    )
    assert result.returncode == 0, result.stderr
    assert "n_recent: 2048" in result.stdout and "lr: 2.0e-05" in result.stdout
    assert "- analyze\n- convert" in result.stdout and "stage: 3" in result.stdout


def test_a_misspelt_key_fails_while_composing():
    result = _run(["train.lrr=1", "--cfg", "job"])
    assert result.returncode != 0
    assert "Key 'lrr' not in 'TrainConfig'" in result.stderr


# ------------------------------------------------------------------------------------------ units


def test_collate_masks_document_starts():
    from train.rows import collate

    rows = [{"input_ids": [5, 6, 7, 8, 9], "position_ids": [3, 4, 0, 1, 2]}]
    batch = collate(rows)
    assert batch["labels"].tolist() == [[5, 6, -100, 8, 9]]
    assert batch["position_ids"].tolist() == [[3, 4, 0, 1, 2]]


def test_teacher_mode_is_the_dense_model_with_lora_off():
    """Self-distillation's teacher: the same weights with PoD and the LoRA adapters switched off."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import pod
    from train.adapt import teacher_mode

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    llama = LlamaForCausalLM(config).eval()
    model = pod.convert_llama(llama, pod.GroupSpec.fixed(4, 2, 4), n_sink=2, n_recent=8)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids = torch.randint(0, 64, (1, 48))
    with torch.no_grad():
        dense = llama(ids).logits
        student = peft_model(input_ids=ids).logits
        with teacher_mode(peft_model):
            teacher = peft_model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(teacher, dense, atol=1e-5)
    assert not torch.allclose(student, dense, atol=1e-3)


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One shrunk tiny run through every stage, from the command line."""
    base = tmp_path_factory.mktemp("pipeline")
    run_dir = base / "run"
    result = _run([f"run_dir={run_dir}", f"cache_dir={base / 'cache'}", *SHRINK], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "| adapted |" in result.stdout
    return run_dir


@pytest.mark.slow
def test_tiny_end_to_end(tiny_run):
    for rel in (
        "config.yaml",
        "metrics.json",
        "logs/pipeline.log",
        "logs/train_log.jsonl",
        "analyze/groups.json",
        "analyze/similarity.png",
        "analyze/proximal_importance.png",
        "adapt/loss.png",
        "evaluate/metrics.json",
        "export/model/README.md",
        "export/model/groups.json",
        "export/model/modeling_pod_llama.py",
    ):
        assert (tiny_run / rel).is_file(), rel
    assert list((tiny_run / "wandb" / "wandb").glob("offline-run-*"))
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    rows = {r["model"]: r for r in metrics["evaluation"]["results"]}
    # The loss went down during adapt: held-out loss (same rows, deterministic) after vs before.
    assert rows["adapted"]["loss"] < rows["converted"]["loss"]
    assert set(rows) == {"dense", "converted", "adapted"}
    assert rows["dense"]["kv_saved"] == 0 and rows["converted"]["kv_saved"] > 0
    assert rows["adapted"]["kv_bytes"] == rows["converted"]["kv_bytes"]
    assert "| adapted |" in (tiny_run / "export/model/README.md").read_text()

    # The export loads in a fresh process with trust_remote_code, without this repository.
    script = (
        "import sys, torch; sys.modules['pod'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('def main():', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=t.pad_token_id)\n"
        "print(type(m).__name__, out.shape[1] - ids.shape[1])\n"
    )
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_run / "export" / "model")],
        capture_output=True,
        text=True,
        cwd=tiny_run,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["PodLlamaForCausalLM", "5"]


def _adapt(run_dir: Path, cache: Path, *extra: str) -> dict:
    from train.run import run_pipeline

    cfg = _compose(
        [
            f"run_dir={run_dir}",
            f"cache_dir={cache}",
            *SHRINK,
            "stages=[adapt]",
            "logging=none",
            "train.max_steps=4",
            "train.save_steps=2",
            *extra,
        ]
    )
    return run_pipeline(cfg)


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_weights(tiny_run, tmp_path):
    """Stopped by train.stop_after_steps, then by the stop file, then killed while saving: same weights."""
    from train.common import StageInterrupted

    straight = _copy_run(tiny_run, tmp_path / "straight")
    cache = tiny_run.parent / "cache"
    _adapt(straight, cache)
    resumed = _copy_run(tiny_run, tmp_path / "resumed")
    with pytest.raises(StageInterrupted, match="stopped after step 2 of 4"):
        _adapt(resumed, cache, "train.stop_after_steps=2")
    assert not (resumed / "adapt" / "DONE").exists()
    checkpoints = resumed / "adapt" / "checkpoints"
    assert (checkpoints / "checkpoint-2").is_dir()
    # The stop file (what the SLURM launcher writes on USR1) saves off the save_steps=2 schedule.
    stop = resumed / "STOP"
    stop.touch()
    with pytest.raises(StageInterrupted, match="saved checkpoint-3 and stopped at step 3 of 4 because"):
        _adapt(resumed, cache)
    assert (checkpoints / "checkpoint-3" / "trainer_state.json").is_file()
    assert not stop.exists()  # consumed, so the next run trains through
    # A process killed while saving leaves a newer checkpoint without trainer_state.json (written last):
    # resuming must skip it, not fail on it or load half a state.
    shutil.copytree(checkpoints / "checkpoint-3", checkpoints / "checkpoint-4")
    (checkpoints / "checkpoint-4" / "trainer_state.json").unlink()
    metrics = _adapt(resumed, cache)
    assert metrics["stages"]["adapt"]["resumed_from"].endswith("checkpoint-3")
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()  # written again, whole
    assert len(list(checkpoints.glob("incomplete-checkpoint-4-*"))) == 1  # set aside, not deleted
    want = load_file(straight / "adapt" / "model" / "model.safetensors")
    got = load_file(resumed / "adapt" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6, rtol=0), name


@pytest.mark.slow
def test_lora_with_self_distillation_in_mean_mode(tiny_run, tmp_path):
    """LoRA + distillation on a mean-mode conversion: shared_k_proj trained via modules_to_save, merged export."""
    from safetensors.torch import load_file as load

    from train.run import run_pipeline

    run_dir = _copy_run(tiny_run, tmp_path / "lora", ("base", "analyze"))
    overrides = [
        f"run_dir={run_dir}",
        f"cache_dir={tiny_run.parent / 'cache'}",
        *SHRINK,
        "stages=[convert,adapt,export]",
        "logging=none",
        "peft=lora",
        "pod.shared_key_init=mean",
        "train.distill.enabled=true",
        "train.distill.alpha=0.5",
        "train.max_steps=2",
        "train.save_steps=2",
        "train.lr=1e-2",
    ]
    run_pipeline(_compose(overrides))
    log = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert any("distill_kl" in record and "distill_ce" in record for record in log)
    assert (run_dir / "adapt" / "model" / "adapter_config.json").is_file()
    converted = load(run_dir / "convert" / "model" / "model.safetensors")
    exported = load(run_dir / "export" / "model" / "model.safetensors")
    assert exported.keys() == converted.keys()  # merged: no lora_ or modules_to_save names left
    shared = [k for k in converted if "shared_k_proj" in k]
    assert shared and any(not torch.equal(converted[k], exported[k]) for k in shared)
    assert not torch.equal(
        converted["model.layers.0.self_attn.q_proj.weight"],
        exported["model.layers.0.self_attn.q_proj.weight"],
    )


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu(tiny_run, tmp_path):
    run_dir = _copy_run(tiny_run, tmp_path / "zero2")
    args = [
        f"run_dir={run_dir}",
        f"cache_dir={tiny_run.parent / 'cache'}",
        *SHRINK,
        "stages=[adapt]",
        "deepspeed=zero2",
        "logging=none",
        "train.max_steps=2",
        "train.save_steps=2",
    ]
    # DeepSpeed builds its shared-memory comm op on first use (~1 min): keep it in the repo's cache.
    result = _run(args, TORCH_EXTENSIONS_DIR=str(ROOT / "cache" / "torch_extensions"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    done = json.loads((run_dir / "adapt" / "DONE").read_text())
    assert done["outputs"]["steps"] == 2 and done["outputs"]["loss_end"] < 20


@pytest.mark.slow
def test_export_is_kept_and_a_failed_push_says_how_to_retry(tiny_run, tmp_path, monkeypatch, caplog):
    from train.export import PushError
    from train.run import run_pipeline

    run_dir = _copy_run(
        tiny_run, tmp_path / "export", ("base", "analyze", "convert", "adapt", "evaluate", "export")
    )
    model_file = run_dir / "export" / "model" / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    base = [
        f"run_dir={run_dir}",
        f"cache_dir={tiny_run.parent / 'cache'}",
        *SHRINK,
        "stages=[export]",
        "logging=none",
    ]
    run_pipeline(_compose(base))
    assert model_file.stat().st_mtime_ns == before  # reused, not rewritten
    run_pipeline(_compose([*base, "export.overwrite=true"]))
    assert model_file.stat().st_mtime_ns != before
    assert "replaced the existing export" in (run_dir / "logs" / "pipeline.log").read_text()

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token_123")
    with pytest.raises(PushError) as err:
        run_pipeline(_compose([*base, "export.push_to_hub=true", "export.repo_id=org/pod-tiny"]))
    message = str(err.value)
    assert (
        "the export is kept at" in message
        and "stages=[export]" in message
        and "export.repo_id=org/pod-tiny" in message
    )
    assert "hf_not_a_real_token_123" not in message
    assert model_file.is_file()
    assert "hf_not_a_real_token_123" not in (run_dir / "logs" / "pipeline.log").read_text()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_bad_input_is_one_line_error_exit_2_and_writes_nothing(tiny_run, tmp_path):
    from transformers import MistralConfig

    mistral = tmp_path / "mistral"
    MistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        mistral
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = {
        "unknown preset": (["conf=llama9_70b"], "unknown preset conf=llama9_70b"),
        "missing model": (
            ["stages=[analyze,convert]", "model.name_or_path=/nonexistent/llama"],
            "/nonexistent/llama",
        ),
        "not a llama": (
            ["stages=[analyze,convert]", f"model.name_or_path={mistral}"],
            "model_type is 'mistral'",
        ),
        "window": (["pod.n_recent=300"], "is not smaller than the training sequence data.seq_len=256"),
        "empty corpus": (["stages=[adapt]", f"data.sources=[{empty}]"], "empty corpus"),
        "deepspeed batch": (["deepspeed=zero2", "deepspeed.train_batch_size=3"], "train_batch_size"),
        "loss chunk": (["train.loss_chunk_size=-1"], "train.loss_chunk_size must be >= 0"),
    }
    procs = {}
    for name, (overrides, _) in cases.items():
        # Each case runs against a copy of a finished run (it must stay as it was) and a fresh folder.
        for where in ("existing", "fresh"):
            run_dir = tmp_path / f"{name.replace(' ', '_')}_{where}"
            if where == "existing":
                _copy_run(tiny_run, run_dir, ("base", "analyze", "convert", "adapt", "evaluate", "export"))
                shutil.copy(tiny_run / "config.yaml", run_dir / "config.yaml")
            args = [f"run_dir={run_dir}", f"cache_dir={tiny_run.parent / 'cache'}", *SHRINK, *overrides]
            procs[name, where] = (
                run_dir,
                _snapshot(run_dir) if run_dir.exists() else None,
                subprocess.Popen(
                    RUN + args,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                    env=_env(),
                ),
            )
    for (name, where), (run_dir, before, proc) in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        assert proc.returncode == 2, (name, where, stderr[-2000:])
        assert lines[-1].startswith("error: "), (name, where, stderr[-2000:])
        if where == "fresh":
            assert cases[name][1] in lines[-1], (name, lines[-1])
            assert not run_dir.exists(), (name, "created the run folder")
        else:
            assert _snapshot(run_dir) == before, (name, "changed the existing run")
