"""An exported PoD checkpoint runs under lm-evaluation-harness (``--model hf``, remote code) on a local task.

The harness cannot download tasks or datasets here, so the tasks are YAML files written into
``tmp_path`` (``--include_path``) reading a local jsonl (``dataset_path: json`` + ``data_files``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pod
from tests.test_export import _tokenizer
from tests.test_model import MIXED, tiny_llama

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval>=0.4.13'")
# Each test starts the harness in a fresh process (~10-30 s on a 2-core CPU).
pytestmark = pytest.mark.slow

N_DOCS = 12
CHOICE_TASK = """task: pod_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: pod_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
"""

# Runs the harness's Python API in a process where `pod` cannot be imported, recording which model
# class it loaded and which cache its generate() used: the exported remote code alone must do it.
API_WITHOUT_POD = """
import json, sys
sys.modules["pod"] = None
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
export, tasks = sys.argv[1], sys.argv[2]
lm = HFLM(pretrained=export, trust_remote_code=True, device="cpu", batch_size=2)
caches = set()
forward = lm.model.forward
def recording_forward(*args, **kwargs):
    out = forward(*args, **kwargs)
    if getattr(out, "past_key_values", None) is not None:
        caches.add(type(out.past_key_values).__name__)
    return out
lm.model.forward = recording_forward
manager = TaskManager(include_path=tasks, include_defaults=False)
result = lm_eval.simple_evaluate(model=lm, tasks=["pod_local_choice", "pod_local_gen"], task_manager=manager)
print(json.dumps({"results": result["results"], "class": type(lm.model).__name__, "caches": sorted(caches)}))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """An exported PoD checkpoint with its tokenizer, a local dataset and the two task YAMLs."""
    root = tmp_path_factory.mktemp("lm_eval")
    # A window far shorter than the questions, so the harness really exercises distant-key sharing.
    model = pod.convert_llama(tiny_llama(), MIXED, n_sink=2, n_recent=5)
    export = root / "export"
    model.save_pretrained(export)
    _tokenizer().save_pretrained(export)
    rng = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(N_DOCS):
        words = torch.randint(4, 124, (24,), generator=rng).tolist()
        question = " ".join(f"w{w}" for w in words[:20])
        docs.append(
            {
                "question": question,
                "choices": [f"w{w}" for w in words[20:23]],
                "label": 1,
                "answer": f"w{words[23]}",
            }
        )
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "pod_local_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tasks / "pod_local_gen.yaml").write_text(GEN_TASK.format(data=data))
    return {"root": root, "export": export, "tasks": tasks, "docs": docs, "model": model}


def _env() -> dict[str, str]:
    # No PYTHONPATH (the checkout's `pod` must not leak in) and nothing from the network.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@torch.no_grad()
def _expected_accuracy(model, docs) -> float:
    """Multiple-choice accuracy computed directly: the choice with the highest summed log-probability."""
    tok = _tokenizer()
    correct = 0
    for doc in docs:
        context = tok(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            ids = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            logprobs = model(torch.tensor([ids]), use_cache=False).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(docs)


def test_lm_eval_cli_scores_an_exported_pod_checkpoint(setup):
    out = setup["root"] / "results"
    command = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={setup['export']},trust_remote_code=True",
        "--tasks", "pod_local_choice,pod_local_gen",
        "--include_path", str(setup["tasks"]),
        "--device", "cpu",
        "--batch_size", "2",
        "--output_path", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env=_env(), cwd=setup["root"], timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results JSON under {out}: {result.stdout[-2000:]}"
    scores = json.loads(files[-1].read_text())["results"]
    acc = scores["pod_local_choice"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert 0.0 <= scores["pod_local_gen"]["exact_match,none"] <= 1.0
    # The harness's score is the PoD model's own: the same choices as computed here directly.
    assert acc == pytest.approx(_expected_accuracy(setup["model"], setup["docs"]))


def test_lm_eval_api_uses_the_remote_code_model_and_its_pod_cache(setup):
    result = subprocess.run(
        [sys.executable, "-c", API_WITHOUT_POD, str(setup["export"]), str(setup["tasks"])],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=setup["root"],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["class"] == "PodLlamaForCausalLM"
    assert got["caches"] == ["PodCache"]  # generate_until ran on the PoD cache
    assert 0.0 <= got["results"]["pod_local_choice"]["acc,none"] <= 1.0
    assert 0.0 <= got["results"]["pod_local_gen"]["exact_match,none"] <= 1.0
