"""Exported PoD checkpoints load with plain transformers (remote code) and generate identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import pod
from tests.test_model import KV_HEADS, LAYERS, MIXED, tiny_llama

LOAD_WITHOUT_POD = """
import json, sys
sys.modules["pod"] = None  # the pod package must not be needed to load an export
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
print(json.dumps({"tokens": out[0].tolist(), "class": type(model).__name__, "cache": type(cache).__name__,
                  "cache_bytes": cache.nbytes(), "vocab": len(tok)}))
"""


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i + 4 for i in range(124)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_export_loads_in_a_fresh_process_without_pod(tmp_path):
    model = pod.convert_llama(tiny_llama(), MIXED, n_sink=3, n_recent=6, shared_key_init="mean")
    out = tmp_path / "export"
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    files = set(os.listdir(out))
    assert {"configuration_pod_llama.py", "modeling_pod_llama.py", "groups.py", "config.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pod_llama.PodLlamaForCausalLM"
    assert config["anchors"] == [list(r) for r in MIXED.anchors]

    prompt = list(range(5, 25))
    want = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_POD, str(out), json.dumps(prompt)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["tokens"] == want[0].tolist()
    assert got["class"] == "PodLlamaForCausalLM" and got["cache"] == "PodCache"
    assert got["cache_bytes"] == pod.kv_cache_bytes(model.config, len(prompt), 1, torch.float32)
    assert got["vocab"] == 128


def test_export_round_trip_in_process(tmp_path):
    model = pod.convert_llama(tiny_llama(), pod.GroupSpec.fixed(LAYERS, KV_HEADS, 2), n_sink=2, n_recent=5)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # registered by `import pod`
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
