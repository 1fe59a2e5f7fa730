"""Several processes on CPU (torchrun + gloo): DeepSpeed ZeRO-2 / ZeRO-3 over 2 processes train like 1.

Every run is the pipeline's real ``adapt`` stage (``torchrun ... train/run.py stages=[adapt]``) on a
copy of one small converted PoD model (a module fixture runs base -> analyze -> convert once). The
global batch is the same everywhere (4 sequences: 1 process x 2 micro x 2 accumulation, or 2
processes x 2 micro), so the loss curves and the final weights must agree to float tolerance.

A checkpoint written by 2 processes resumes under 1 and the other way round: DeepSpeed refuses ZeRO
partitions written under another world size, so ``train/adapt.py`` converts such a checkpoint to a
universal one first (see docs/scaleout.md); the resumed run must end where the uninterrupted one did.
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
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

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
    "logging=none",
]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_"))
    }
    # DeepSpeed builds its shm_comm op on first use (~45 s): keep the build across test sessions.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "cache" / "torch_extensions"))
    return env | {
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def _pipeline(nproc: int | None, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``train/run.py`` in one plain process (``nproc=None``) or under ``torchrun --nproc_per_node``."""
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    # All runs of a session share one cache_dir (base model, tokenized corpus) next to their folders.
    cache = f"cache_dir={run_dir.parent / 'cache'}"
    command = [*launcher, str(ROOT / "train" / "run.py"), f"run_dir={run_dir}", cache, *SHRINK, *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]


def _copy(prepared: Path, name: str) -> Path:
    """A new run folder next to ``prepared`` holding its finished base, analyze and convert stages."""
    dst = prepared.parent / name
    for stage in ("base", "analyze", "convert"):
        shutil.copytree(prepared / stage, dst / stage)
    return dst


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted((run_dir / "adapt" / "model").glob("*.safetensors")):
        tensors.update(load_file(file))
    assert tensors, f"no weights in {run_dir / 'adapt' / 'model'}"
    return tensors


def _assert_same_training(got: Path, want: Path, steps: range | None = None) -> None:
    got_losses, want_losses = _losses(got), _losses(want)
    steps = steps or range(1, 7)
    assert [got_losses[s] for s in steps] == pytest.approx([want_losses[s] for s in steps], rel=1e-4)
    got_weights, want_weights = _weights(got), _weights(want)
    # The tiny model ties lm_head to the embeddings: a plain save leaves the copy out, a DeepSpeed
    # save (the engine's state dict) writes it. Where written, it must be the embedding.
    for weights in (got_weights, want_weights):
        if "lm_head.weight" in weights:
            torch.testing.assert_close(weights.pop("lm_head.weight"), weights["model.embed_tokens.weight"])
    assert got_weights.keys() == want_weights.keys()
    for name, tensor in want_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny PoD model (base -> analyze -> convert), made once in one process."""
    run_dir = tmp_path_factory.mktemp("distributed") / "prepared"
    _ok(_pipeline(None, run_dir, "stages=[base,analyze,convert]"))
    return run_dir


@pytest.fixture(scope="module")
def one_process(prepared: Path) -> Path:
    """The reference: 6 adapt steps in one plain process (no DeepSpeed), batch 4 = 2 micro x 2 accum."""
    run_dir = _copy(prepared, "one_process")
    _ok(_pipeline(None, run_dir, "stages=[adapt]"))
    return run_dir


# ZeRO-3 also computes the loss in chunks (its lm_head is gathered again when backward recomputes a
# chunk's logits): still the one-process curve, which used the standard loss.
@pytest.mark.parametrize(("zero", "extra"), [("zero2", ()), ("zero3", ("train.loss_chunk_size=48",))])
def test_two_processes_train_like_one(
    zero: str, extra: tuple[str, ...], prepared: Path, one_process: Path
) -> None:
    run_dir = _copy(prepared, zero)
    result = _pipeline(2, run_dir, "stages=[adapt]", f"deepspeed={zero}", *extra)
    _ok(result)
    log = (run_dir / "logs" / "pipeline.log").read_text()
    assert "world 2" in log and (("chunks of 48 positions" in log) == bool(extra))
    _assert_same_training(run_dir, one_process)


@pytest.fixture(scope="module")
def stopped(prepared: Path):
    """``stopped(zero, nproc)``: a run stopped after step 3 of 6 (as a killed job would be, with its
    checkpoint), made once per (ZeRO stage, world size) and shared by the tests that resume it."""
    runs: dict[tuple[str, int], Path] = {}

    def make(zero: str, nproc: int) -> Path:
        if (zero, nproc) not in runs:
            run_dir = _copy(prepared, f"stopped_{zero}_{nproc}")
            first = _pipeline(
                nproc, run_dir, "stages=[adapt]", f"deepspeed={zero}", "train.stop_after_steps=3"
            )
            assert first.returncode != 0 and "stopped after step 3 of 6" in first.stderr, first.stderr[-3000:]
            shards = list(
                (run_dir / "adapt" / "checkpoints" / "checkpoint-3").glob("global_step3/*optim_states.pt")
            )
            assert len(shards) == nproc, shards
            runs[zero, nproc] = run_dir
        return runs[zero, nproc]

    return make


@pytest.mark.parametrize(
    ("zero", "first", "then"), [("zero2", 2, 2), ("zero2", 2, 1), ("zero2", 1, 2), ("zero3", 2, 1)]
)
def test_resume_under_the_same_or_another_world_size(
    zero: str, first: int, then: int, stopped, one_process: Path
) -> None:
    """Rerun a stopped run with ``then`` processes: it resumes from checkpoint-3 and ends like one process."""
    source = stopped(zero, first)
    run_dir = source.with_name(f"resumed_{zero}_{first}_to_{then}")
    shutil.copytree(source, run_dir)
    _ok(_pipeline(then, run_dir, "stages=[adapt]", f"deepspeed={zero}"))
    done = json.loads((run_dir / "adapt" / "DONE").read_text())
    assert done["outputs"]["resumed_from"].endswith("checkpoint-3")
    universal = (run_dir / "adapt" / "checkpoints" / "checkpoint-3" / "latest_universal").is_file()
    assert universal == (first != then)  # converted only when the number of processes changed
    _assert_same_training(run_dir, one_process)
