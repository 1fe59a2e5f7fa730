"""Evaluation library and baselines: passkey scoring, perplexity buckets, KV bytes, batch sizes, errors."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

import pod
from pod.baselines import PodSnapKV, balanced_spec, budget_report, build_baselines, equalize_budget
from pod.evaluation import (
    EvaluationError,
    greedy_continuations,
    kv_cache_bytes_measured,
    max_batch_size,
    measure_max_batch_size,
    passkey_correct,
    passkey_grid,
    perplexity,
    plot_passkey_heatmap,
    throughput,
)
from tests.test_model import KV_HEADS, LAYERS, tiny_llama

N_SINK, N_RECENT, SEQ = 4, 16, 96
SPEC = pod.GroupSpec.fixed(LAYERS, KV_HEADS, 3)
MIXED_SPEC = pod.GroupSpec.from_block_starts([[0, 2, 3], [0, 1, 4]], LAYERS)
DIGIT0 = 10  # token ids 10..19 are the digits 0..9 in the toy vocabulary below


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core CPU spin-wait with two threads; one is much faster here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(max_position_embeddings=256)


@pytest.fixture(scope="module")
def baselines(llama):
    return build_baselines(llama, SPEC, n_sink=N_SINK, n_recent=N_RECENT, seq_len=SEQ)


def decode(ids: list[int]) -> str:
    """The toy vocabulary: ids 10..19 are digits, everything else a word."""
    return "".join(str(i - DIGIT0) if DIGIT0 <= i < DIGIT0 + 10 else f" w{i} " for i in ids)


@dataclass
class Sample:
    prompt_ids: list[int]
    answer: str
    depth: float
    context_len: int


def make_sample(context_len: int, depth: float, seed: int) -> Sample:
    """Filler words with the key's digit tokens at ``depth``, then a question word."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = [100] + [DIGIT0 + int(c) for c in key]
    filler = [rng.randint(30, 90) for _ in range(context_len - len(needle) - 2)]
    at = round(depth * len(filler))
    return Sample([1] + filler[:at] + needle + filler[at:] + [101], key, depth, context_len)


GRID = [
    make_sample(c, d, seed=i * 10 + j) for i, c in enumerate((48, 80)) for j, d in enumerate((0.0, 0.5, 1.0))
]


# ------------------------------------------------------------------------------------------ passkey


def test_passkey_scorer():
    assert passkey_correct(" 12345.", "12345") and passkey_correct("is 12345 and 99999", "12345")
    assert not passkey_correct("123456", "12345") and not passkey_correct("1234", "12345")
    assert not passkey_correct("no digits", "12345") and not passkey_correct("99999 12345", "12345")


def test_oracle_scores_one_and_random_digits_score_zero(tmp_path):
    answers = {tuple(s.prompt_ids): s.answer for s in GRID}

    def oracle(prompt, max_new_tokens):
        return [DIGIT0 + int(c) for c in answers[tuple(prompt)]][:max_new_tokens] + [2]

    rng = random.Random(0)

    def guesser(prompt, max_new_tokens):
        return [DIGIT0 + rng.randrange(10) for _ in range(max_new_tokens)]

    right = passkey_grid(None, GRID, decode=decode, generate_fn=oracle, max_new_tokens=6, progress=False)
    assert right["accuracy"] == 1.0 and right["matrix"] == [[1.0] * 3] * 2
    assert right["context_lens"] == [48, 80] and right["depths"] == [0.0, 0.5, 1.0]
    assert sum(c["n"] for c in right["cells"]) == len(GRID) == right["samples"]
    wrong = passkey_grid(None, GRID, decode=decode, generate_fn=guesser, max_new_tokens=6, progress=False)
    assert wrong["accuracy"] == 0.0 and all(c["accuracy"] == 0.0 for c in wrong["cells"])
    path = plot_passkey_heatmap(right, tmp_path / "niah.png", title="oracle")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_streaming_llm_cannot_see_a_needle_outside_its_window(baselines):
    """Two prompts that differ only in the key, far outside sinks + window: the StreamingLLM-style
    model continues them identically (it cannot answer better than chance), PoD and dense do not."""
    a = make_sample(80, 0.3, seed=1)
    b = list(a.prompt_ids)
    start = b.index(100) + 1
    b[start : start + 5] = [DIGIT0 + (t - DIGIT0 + 1) % 10 for t in b[start : start + 5]]
    assert start > N_SINK and len(b) - start > N_RECENT + 5
    same = greedy_continuations(baselines["streaming_llm"], [a.prompt_ids, b], max_new_tokens=6)
    assert same[0] == same[1]
    for name in ("pod", "dense"):
        with torch.no_grad():
            out = baselines[name](torch.tensor([a.prompt_ids, b]), use_cache=False).logits[:, -1]
        assert (out[0] - out[1]).abs().max() > 1e-4, name


def test_passkey_grid_runs_the_models_own_generate(baselines):
    result = passkey_grid(
        baselines["pod"], GRID, decode=decode, max_new_tokens=6, batch_size=2, progress=False
    )
    alone = greedy_continuations(baselines["pod"], [s.prompt_ids for s in GRID], max_new_tokens=6)
    assert [r["output"] for r in result["predictions"]] == [decode(ids) for ids in alone]
    assert len(result["matrix"]) == 2 and 0.0 <= result["accuracy"] <= 1.0


# ------------------------------------------------------------------------------------------ perplexity


def test_perplexity_buckets_sum_to_the_overall_loss(baselines):
    ids = torch.randint(3, 128, (5, SEQ), generator=torch.Generator().manual_seed(0))
    for name in ("dense", "pod"):
        result = perplexity(baselines[name], ids, batch_size=2, buckets=[1, 20, 50, SEQ], progress=False)
        tokens = sum(b["tokens"] for b in result["buckets"])
        assert tokens == result["tokens"] == 5 * (SEQ - 1)
        weighted = sum(b["loss"] * b["tokens"] for b in result["buckets"]) / tokens
        assert weighted == pytest.approx(result["loss"], rel=1e-12)
        assert result["ppl"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)


def test_perplexity_of_packed_rows_skips_document_starts(llama):
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(24), torch.arange(40)])
    rows = [{"input_ids": row.tolist(), "position_ids": positions.tolist()} for row in ids]
    result = perplexity(llama, rows, buckets=3, progress=False)
    assert result["tokens"] == 2 * 62  # two document starts per row are not scored
    assert sum(b["tokens"] for b in result["buckets"]) == result["tokens"]
    # A window covering the whole sequence is the dense model.
    wide = pod.convert_llama(llama, SPEC, n_sink=N_SINK, n_recent=64)
    assert perplexity(wide, rows, buckets=3, progress=False)["loss"] == pytest.approx(
        result["loss"], abs=1e-5
    )


# ------------------------------------------------------------------------------------------ KV bytes


@pytest.mark.parametrize("equal_budget", [False, True])
def test_every_baseline_holds_its_formula_bytes(llama, equal_budget):
    models = build_baselines(
        llama, SPEC, n_sink=N_SINK, n_recent=N_RECENT, seq_len=SEQ, equal_budget=equal_budget, snapkv_keep=20
    )
    assert list(models) == ["dense", "streaming_llm", "cla", "pod", "pod_snapkv"]
    report = budget_report(models, SEQ, batch_size=2)
    for name, row in report.items():
        assert row["kv_bytes_measured"] == row["kv_bytes"], name
    budget = report["pod"]["kv_bytes"]
    assert report["dense"]["kv_bytes"] == 2 * LAYERS * KV_HEADS * SEQ * 16 * 2 * 4
    assert report["dense"]["saved"] == 0.0 and report["pod"]["saved"] > 0.0
    # SnapKV keeps 20 of the 76 distant slots: the PoD cache of 4 + 20 + 16 slots.
    assert report["pod_snapkv"]["kv_bytes"] == pod.kv_cache_bytes(
        models["pod"].config, N_SINK + 20 + N_RECENT, 2
    )
    if equal_budget:
        for name in ("streaming_llm", "cla"):
            assert report[name]["kv_bytes"] <= budget
            assert report[name]["fill"] > 0.95, (name, report[name])


def test_equalize_budget_is_the_closest_fit(llama):
    budget = pod.kv_cache_bytes(pod.convert_llama(llama, SPEC, n_sink=N_SINK, n_recent=N_RECENT).config, SEQ)
    choice = equalize_budget(llama.config, budget, SEQ, n_sink=N_SINK, n_recent=N_RECENT)
    streaming, cla = choice["streaming_llm"], choice["cla"]
    assert streaming.kv_bytes <= budget and cla.kv_bytes <= budget
    # One more window token, or one more anchor, would exceed the budget.
    wider = pod.convert_llama(
        llama,
        pod.GroupSpec.identity(LAYERS, KV_HEADS),
        n_sink=N_SINK,
        n_recent=streaming.n_recent + 1,
        distant_policy="drop",
    )
    assert pod.kv_cache_bytes(wider.config, SEQ) > budget
    more = pod.convert_llama(
        llama,
        balanced_spec(LAYERS, KV_HEADS, cla.value + 1),
        n_sink=N_SINK,
        n_recent=N_RECENT,
        distant_policy="shared_kv",
    )
    assert pod.kv_cache_bytes(more.config, SEQ) > budget
    assert cla.spec.num_anchors == cla.value and cla.to_dict()["fill"] <= 1.0
    assert balanced_spec(LAYERS, KV_HEADS, LAYERS * KV_HEADS // 3) == SPEC


@pytest.mark.parametrize("name", ["dense", "streaming_llm", "pod"])
def test_max_batch_size_formula_matches_measurement(baselines, name):
    model = baselines[name]
    per_sequence = kv_cache_bytes_measured(model, 40)
    assert per_sequence == pod.kv_cache_bytes(model.config, 40)
    for budget in (per_sequence - 1, per_sequence, 3 * per_sequence + 7, 5 * per_sequence):
        expected = max_batch_size(model.config, 40, budget)
        assert expected == budget // per_sequence
        assert measure_max_batch_size(model, 40, budget, max_batch=8) == expected


def test_throughput_reports_speed_and_the_cache_after_decoding(baselines):
    for name in ("dense", "pod"):
        result = throughput(baselines[name], 48, batch_size=2, decode_steps=4)
        assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
        assert result["kv_bytes"] == pod.kv_cache_bytes(baselines[name].config, 52, 2)


# ------------------------------------------------------------------------------------------ PoD + SnapKV


@pytest.mark.parametrize("mode", ["anchor", "mean"])
def test_snapkv_keeping_every_distant_slot_is_pod(llama, mode):
    model = pod.convert_llama(llama, MIXED_SPEC, n_sink=N_SINK, n_recent=N_RECENT, shared_key_init=mode)
    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    assert PodSnapKV(model, keep=80).generate(ids, 6).tolist() == greedy_continuations(model, ids.tolist(), 6)
    rows = torch.randint(3, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    bucket = perplexity(model, rows, buckets=[64, SEQ], progress=False)["buckets"][0]
    assert PodSnapKV(model, keep=80).suffix_loss(rows, 64)["loss"] == pytest.approx(bucket["loss"], abs=1e-5)
    small = PodSnapKV(model, keep=10)
    cache, _ = small.prefill(ids)
    assert (
        cache.nbytes()
        == small.cache_bytes(80, 2)
        == pod.kv_cache_bytes(model.config, N_SINK + 10 + N_RECENT, 2)
    )
    assert len(small.generate(ids, 6)[0]) == 6


def test_snapkv_keeps_the_slots_the_observation_window_attends_most():
    """Brute force from a plain Llama: with one block [0-1] per head, layers 0 and 1 see the dense
    model's inputs, so their queries and layer 0's keys can be computed independently of PoD."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    llama = tiny_llama(seed=3, num_hidden_layers=2)
    model = pod.convert_llama(llama, pod.GroupSpec.fixed(2, KV_HEADS, 2), n_sink=N_SINK, n_recent=N_RECENT)
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda mod, args, kwargs, out: inputs.__setitem__(mod.layer_idx, kwargs), with_kwargs=True
        )
        for layer in llama.model.layers
    ]
    with torch.no_grad():
        llama(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    window, keep, kernel, distant = 16, 8, 7, 70 - N_SINK - N_RECENT
    attn0 = llama.model.layers[0].self_attn
    cos, sin = inputs[0]["position_embeddings"]

    def project(layer, proj):
        x = inputs[layer]["hidden_states"]
        return getattr(llama.model.layers[layer].self_attn, proj)(x).view(1, 70, -1, 16).transpose(1, 2)

    keys = apply_rotary_pos_emb(project(0, "k_proj"), project(0, "k_proj"), cos, sin)[1]
    values = project(0, "v_proj")
    cache, _ = PodSnapKV(model, keep=keep, window=window, kernel=kernel).prefill(ids)
    for head in range(KV_HEADS):
        score = torch.zeros(distant)
        for layer in (0, 1):
            q = apply_rotary_pos_emb(project(layer, "q_proj"), project(layer, "q_proj"), cos, sin)[0]
            for qh in (2 * head, 2 * head + 1):
                logits = q[0, qh, -window:] @ keys[0, head, N_SINK : N_SINK + distant].T * attn0.scaling
                score += logits.softmax(-1).sum(0)
        pooled = torch.nn.functional.avg_pool1d(score[None, None], kernel, 1, kernel // 2)[0, 0]
        kept = pooled.topk(keep).indices.sort().values + N_SINK
        want = torch.cat([values[0, head, :N_SINK], values[0, head, kept], values[0, head, 70 - N_RECENT :]])
        assert torch.allclose(cache.layers[0].full["v"][0, head], want, atol=1e-5)
        assert not torch.allclose(kept, torch.arange(keep) + N_SINK)  # not trivially the first slots


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors(baselines, llama):
    model = baselines["pod"]
    with pytest.raises(EvaluationError, match="max_position_embeddings=256"):
        passkey_grid(model, [make_sample(300, 0.5, 0)], decode=decode, progress=False)
    with pytest.raises(EvaluationError, match="prompt \\+ max_new_tokens"):
        passkey_grid(model, [make_sample(250, 0.5, 0)], decode=decode, max_new_tokens=8, progress=False)
    for depth in (-0.1, 1.5):
        bad = make_sample(48, 0.5, 0)
        bad.depth = depth
        with pytest.raises(EvaluationError, match="outside \\[0, 1\\]"):
            passkey_grid(None, [bad], decode=decode, generate_fn=lambda p, n: [], progress=False)
    with pytest.raises(EvaluationError, match="max_position_embeddings"):
        perplexity(model, torch.zeros(1, 300, dtype=torch.long), progress=False)
    with pytest.raises(EvaluationError, match="max_position_embeddings"):
        kv_cache_bytes_measured(model, 257)
    with pytest.raises(EvaluationError, match="strictly increasing"):
        perplexity(model, torch.zeros(1, 8, dtype=torch.long), buckets=[5, 5], progress=False)
    with pytest.raises(ValueError, match="smaller than a StreamingLLM-style cache of the 4 sinks"):
        equalize_budget(llama.config, 1000, SEQ, n_sink=N_SINK, n_recent=N_RECENT)
    with pytest.raises(ValueError, match="num_anchors=1 must be in"):
        balanced_spec(LAYERS, KV_HEADS, 1)
