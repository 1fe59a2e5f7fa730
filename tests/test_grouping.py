"""The grouping stage: similarity analysis, grouping strategies, proximal importance, plots, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import pod
from pod.grouping import (
    CalibrationError,
    GroupingError,
    ProximalImportance,
    SimilarityResult,
    UnreachableSavingError,
    UnsupportedModelError,
    analyze_similarity,
    group_layers,
    main,
    max_kv_saving,
    proximal_importance,
    proximal_logits,
    retained_similarity,
    search_delta,
)
from pod.plots import plot_proximal_importance, plot_similarity, plot_similarity_heads

LAYERS, HEADS, KV_HEADS, VOCAB = 5, 4, 2, 128
N_SINK, N_RECENT, N_QUERIES = 4, 16, 8
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CPU is shared: with two OpenMP threads on a loaded machine, tiny matmuls spin-wait and run
    # ~100x slower. One thread keeps this file fast; the setting is restored for other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, layers: int = LAYERS) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        # Larger than the default 0.02 so that random attention is peaked rather than uniform: with
        # near-uniform attention every pair of layers would look alike.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def token_ids(n: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def make_twins(model: LlamaForCausalLM, layer: int) -> None:
    """Layer ``layer + 1`` becomes a copy of ``layer``, which then leaves the residual stream unchanged."""
    layers = model.model.layers
    layers[layer + 1].load_state_dict(layers[layer].state_dict())
    with torch.no_grad():
        layers[layer].self_attn.o_proj.weight.zero_()
        layers[layer].mlp.down_proj.weight.zero_()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def result(llama) -> SimilarityResult:
    return analyze_similarity(
        llama, token_ids(2, 96), n_sink=N_SINK, n_recent=N_RECENT, n_queries=N_QUERIES, progress=False
    )


def random_similarity(seed: int, heads: int = 3, layers: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sim = rng.uniform(0.0, 1.0, (heads, layers, layers))
    sim = (sim + sim.transpose(0, 2, 1)) / 2
    sim[:, np.arange(layers), np.arange(layers)] = 1.0
    return sim


# ------------------------------------------------------------------------------------------ similarity


def test_similarity_shape_range_symmetry_and_metadata(result):
    sim = result.similarity
    assert sim.shape == (KV_HEADS, LAYERS, LAYERS) and sim.dtype == np.float64
    assert np.all(sim >= 0.0) and np.all(sim <= 1.0)
    np.testing.assert_array_equal(sim, sim.transpose(0, 2, 1))
    np.testing.assert_array_equal(sim[:, np.arange(LAYERS), np.arange(LAYERS)], 1.0)
    assert (result.n_sink, result.n_recent, result.n_queries) == (N_SINK, N_RECENT, N_QUERIES)
    assert (result.seq_len, result.num_sequences) == (96, 2)


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    ratio = np.divide(p, q, out=np.ones_like(p), where=p > 0)
    return (p * np.log2(ratio)).sum(-1)


def test_similarity_equals_brute_force_from_eager_attention_weights(llama):
    """Reference: full T x T attention weights (eager, output_attentions), sliced, renormalised, pooled."""
    sequences = [token_ids(1, 96, seed=3)[0], token_ids(1, 120, seed=4)[0]]  # lengths may differ
    got = analyze_similarity(
        llama, sequences, n_sink=N_SINK, n_recent=N_RECENT, n_queries=N_QUERIES, chunk_size=3, progress=False
    ).similarity
    reference = np.zeros((KV_HEADS, LAYERS, LAYERS))
    llama.set_attn_implementation("eager")
    try:
        for seq in sequences:
            with torch.no_grad():
                attentions = llama(seq[None], output_attentions=True).attentions
            t = len(seq)
            i = torch.arange(t - N_QUERIES, t)[:, None]
            j = torch.arange(t)[None, :]
            distant = (j >= N_SINK) & (i - j >= N_RECENT)
            probs = []
            for layer in range(LAYERS):
                weights = attentions[layer][0, :, t - N_QUERIES :].double() * distant
                weights = weights / weights.sum(-1, keepdim=True)
                probs.append(weights.view(KV_HEADS, HEADS // KV_HEADS, N_QUERIES, t).mean(1).numpy())
            for head in range(KV_HEADS):
                for a in range(LAYERS):
                    for b in range(LAYERS):
                        p, q = probs[a][head], probs[b][head]
                        m = (p + q) / 2
                        js = 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)
                        reference[head, a, b] += (1.0 - js).sum()
    finally:
        llama.set_attn_implementation("sdpa")
    reference /= len(sequences) * N_QUERIES
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert llama.config._attn_implementation == "sdpa"


def test_twin_layers_have_similarity_one_and_share_a_block():
    model = tiny_llama(seed=2)
    make_twins(model, 1)
    result = analyze_similarity(
        model, token_ids(2, 96), n_sink=N_SINK, n_recent=N_RECENT, n_queries=N_QUERIES, progress=False
    )
    sim = result.similarity
    np.testing.assert_allclose(sim[:, 1, 2], 1.0, atol=1e-6)
    unrelated = [(0, 1), (0, 3), (1, 3), (2, 4), (3, 4)]
    assert max(sim[:, a, b].max() for a, b in unrelated) < 0.99
    spec = group_layers(result, "greedy", delta=0.99)
    for head in range(KV_HEADS):
        assert spec.anchors[2][head] == spec.anchors[1][head]
        assert spec.is_anchor(3, head) and spec.is_anchor(4, head)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor returned by any aten op (model forward included) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.numel() * tensor.element_size() > self.bytes:
                self.bytes, self.op = tensor.numel() * tensor.element_size(), str(func)
        return out


def test_long_sequence_never_materialises_a_t_by_t_matrix():
    """Peak RSS is process-wide and noisy, and tracemalloc does not see torch; instead every tensor any
    aten op creates during the analysis (the model's forward, the captured states, the distant-attention
    chunks) is measured. A T x T fp32 score matrix of a single head would be T*T*4 bytes (16 MiB at
    T=2048; the model has 4 query heads, so eager attention would make 64 MiB); the bound is an eighth
    of one head's, which even a T x T boolean mask (T*T bytes) would break. The instrument is checked
    on eager attention, which does build [heads, T, T].
    """
    model = tiny_llama(layers=4)
    t = 2048
    bound = t * t * 4 // 8
    with LargestTensor() as largest:
        result = analyze_similarity(
            model, token_ids(1, t), n_sink=N_SINK, n_recent=64, n_queries=32, progress=False
        )
    assert result.similarity.shape == (KV_HEADS, 4, 4)
    assert largest.bytes < bound, (largest.bytes, largest.op)
    print(
        f"largest tensor at T={t}: {largest.bytes} bytes ({largest.op}); bound {bound}; T*T*heads*4 = {t * t * HEADS * 4}"
    )

    t_small = 256
    model.set_attn_implementation("eager")
    try:
        with LargestTensor() as eager, torch.no_grad():
            model(token_ids(1, t_small), use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    assert eager.bytes >= t_small * t_small * HEADS * 4


# ------------------------------------------------------------------------------------------ grouping


@pytest.mark.parametrize("delta", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_honours_delta(seed, delta):
    sim = random_similarity(seed)
    spec = group_layers(sim, "greedy", delta=delta)
    for head in range(sim.shape[0]):
        blocks = spec.blocks(head)
        assert blocks[0][0] == 0
        for index, (first, stop) in enumerate(blocks):
            assert all(sim[head, first, layer] >= delta for layer in range(first + 1, stop))
            if index > 0:
                assert sim[head, blocks[index - 1][0], first] < delta
    if delta == 0.0:
        assert spec.num_anchors == sim.shape[0]


def test_fixed_block_sizes():
    sim = random_similarity(0, layers=7)
    spec = group_layers(sim, "fixed", block_size=3)
    for head in range(sim.shape[0]):
        assert spec.blocks(head) == [(0, 3), (3, 6), (6, 7)]
    assert group_layers(sim, "fixed", block_size=1) == pod.GroupSpec.identity(7, 3)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8, 1.0])
def test_target_reaches_the_saving_with_the_best_retained_similarity(fraction, per_layer):
    sim = random_similarity(3)
    heads, layers = sim.shape[0], sim.shape[1]
    params = dict(seq_len=32768, n_sink=16, n_recent=4080)
    target = fraction * max_kv_saving(layers, heads, **params)
    spec = group_layers(sim, "target", target_saving=target, per_layer=per_layer, **params)
    assert spec.kv_saving(**params) >= target - 1e-12
    assert spec.per_layer or not per_layer
    best = retained_similarity(sim, spec)
    # Every stricter greedy grouping (one that keeps more similarity) misses the target.
    for delta in np.linspace(0.0, 1.0, 201):
        other = group_layers(sim, "greedy", delta=float(delta), per_layer=per_layer)
        if retained_similarity(sim, other) > best + 1e-12:
            assert other.kv_saving(**params) < target
    assert pod.GroupSpec.identity(layers, heads).kv_saving(**params) < target
    delta = search_delta(sim, target, per_layer=per_layer, **params)
    assert group_layers(sim, "greedy", delta=delta, per_layer=per_layer) == spec


def test_target_takes_n_sink_and_n_recent_from_a_similarity_result(result):
    spec = group_layers(result, "target", target_saving=0.05, seq_len=256)
    assert spec.kv_saving(256, N_SINK, N_RECENT) >= 0.05


@pytest.mark.parametrize("strategy", ["greedy", "target"])
def test_per_layer_gives_the_same_anchors_to_every_head(strategy):
    sim = random_similarity(4)
    spec = group_layers(
        sim, strategy, delta=0.4, target_saving=0.2, seq_len=32768, n_sink=16, n_recent=4080, per_layer=True
    )
    assert spec.per_layer
    assert all(len(set(row)) == 1 for row in spec.anchors)
    if strategy == "greedy":
        mean = sim.mean(axis=0)
        expected = group_layers(mean[None], "greedy", delta=0.4)
        assert [row[0] for row in spec.anchors] == [row[0] for row in expected.anchors]


def test_json_and_npz_round_trips(result, tmp_path):
    spec = group_layers(result, "greedy", delta=0.3)
    spec.save(tmp_path / "groups.json", strategy="greedy", delta=0.3, kv_saving=0.1)
    assert pod.GroupSpec.load(tmp_path / "groups.json") == spec
    assert json.loads((tmp_path / "groups.json").read_text())["strategy"] == "greedy"
    result.save(tmp_path / "similarity.npz")
    loaded = SimilarityResult.load(tmp_path / "similarity.npz")
    np.testing.assert_array_equal(loaded.similarity, result.similarity)
    assert (loaded.n_sink, loaded.n_recent, loaded.n_queries, loaded.seq_len, loaded.num_sequences) == (
        N_SINK,
        N_RECENT,
        N_QUERIES,
        96,
        2,
    )
    curve = ProximalImportance(
        sizes=[8, 16], agreement=[0.5, 1.0], n_sink=4, n_queries=8, seq_len=96, num_sequences=2
    )
    curve.save(tmp_path / "curve.json")
    assert ProximalImportance.load(tmp_path / "curve.json") == curve


# ------------------------------------------------------------------------------------------ proximal importance


def test_restricted_attention_equals_a_manual_masked_computation(llama):
    """Reference: one eager forward over the whole sequence with an explicit 4-D mask: causal for the
    context, sink + window for the last n_queries rows."""
    seq = token_ids(1, 80, seed=5)[0]
    t, n_queries, size = len(seq), 12, 20
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    allowed = j <= i
    restricted = (j < N_SINK) | (i - j < size - N_SINK)
    allowed = allowed & (restricted | (i < t - n_queries))
    mask = torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    llama.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            expected = llama(seq[None], attention_mask=mask, use_cache=False).logits[0, t - n_queries :]
            full = llama(seq[None], use_cache=False).logits[0, t - n_queries :]
    finally:
        llama.set_attn_implementation("sdpa")
    got = proximal_logits(llama, seq, size, n_sink=N_SINK, n_queries=n_queries)
    assert (got - expected).abs().max() < 1e-4
    assert (got - full).abs().max() > 1e-2  # the restriction does change the output
    assert (proximal_logits(llama, seq, None, n_sink=N_SINK, n_queries=n_queries) - full).abs().max() < 1e-4
    assert (proximal_logits(llama, seq, t, n_sink=N_SINK, n_queries=n_queries) - full).abs().max() < 1e-4


def test_proximal_importance_curve(llama):
    curve = proximal_importance(
        llama, token_ids(2, 96), [64, 8, 16, 96], n_sink=N_SINK, n_queries=16, progress=False
    )
    assert curve.sizes == [8, 16, 64, 96]
    assert all(0.0 <= a <= 1.0 for a in curve.agreement)
    assert curve.agreement[-1] == 1.0  # n = T: every token is proximal
    assert (curve.num_sequences, curve.n_queries, curve.seq_len) == (2, 16, 96)
    assert llama.config._attn_implementation == "sdpa" and not llama.training


# ------------------------------------------------------------------------------------------ plots


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(result, tmp_path):
    for per_layer in (False, True):
        spec = group_layers(result, "greedy", delta=0.3, per_layer=per_layer)
        assert _is_png(plot_similarity(result, spec, tmp_path / f"mean_{per_layer}.png"))
        assert _is_png(plot_similarity_heads(result, spec, tmp_path / f"heads_{per_layer}.png"))
    curve = ProximalImportance(
        sizes=[8, 16, 32], agreement=[0.2, 0.5, 1.0], n_sink=4, n_queries=8, seq_len=64, num_sequences=1
    )
    assert _is_png(plot_proximal_importance(curve, tmp_path / "curve.png"))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors(llama, result):
    with pytest.raises(CalibrationError, match=r"at least n_sink \+ n_recent \+ n_queries = 28 tokens"):
        analyze_similarity(llama, token_ids(1, 27), n_sink=N_SINK, n_recent=N_RECENT, n_queries=N_QUERIES)
    for delta in (-0.1, 1.5):
        with pytest.raises(GroupingError, match=r"delta must be in \[0, 1\]"):
            group_layers(result, "greedy", delta=delta)
    reachable = max_kv_saving(LAYERS, KV_HEADS, seq_len=256, n_sink=N_SINK, n_recent=N_RECENT)
    with pytest.raises(UnreachableSavingError, match=f"the maximum is {reachable:.4f}"):
        group_layers(result, "target", target_saving=reachable + 0.01, seq_len=256)
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
        )
    )
    with pytest.raises(UnsupportedModelError, match="model_type 'mistral'"):
        analyze_similarity(mistral, token_ids(1, 64), n_sink=N_SINK, n_recent=N_RECENT, n_queries=N_QUERIES)
    with pytest.raises(UnsupportedModelError):
        proximal_importance(mistral, token_ids(1, 64), [8], n_sink=N_SINK, n_queries=N_QUERIES)
    for block_size in (0, -2, None):
        with pytest.raises(GroupingError, match="block_size"):
            group_layers(result, "fixed", block_size=block_size)
    with pytest.raises(GroupingError, match="unknown strategy"):
        group_layers(result, "random")
    with pytest.raises(GroupingError, match="needs target_saving"):
        group_layers(result, "target", seq_len=256)
    with pytest.raises(GroupingError, match="proximal size"):
        proximal_importance(llama, token_ids(1, 64), [N_SINK], n_sink=N_SINK, n_queries=N_QUERIES)
    with pytest.raises(GroupingError, match=r"\[num_kv_heads, L, L\]"):
        group_layers(np.ones((3, 3)))


# ------------------------------------------------------------------------------------------ command line

WORDS = [f"w{i}" for i in range(100)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer (built here, nothing downloaded), saved together."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{word: index + 3 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    tiny_llama(layers=4).save_pretrained(folder)
    return folder


def _texts(count: int, words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(count)]


def test_cli_end_to_end(model_dir, tmp_path, capsys):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in _texts(4, 60)))
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(out),
            "--n-sink",
            "4",
            "--n-recent",
            "16",
            "--n-queries",
            "8",
            "--seq-len",
            "64",
            "--num-sequences",
            "3",
            "--strategy",
            "target",
            "--target-saving",
            "0.1",
            "--sizes",
            "8",
            "16",
            "32",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    groups = json.loads((out / "groups.json").read_text())
    spec = pod.GroupSpec.load(out / "groups.json")
    assert (spec.num_layers, spec.num_kv_heads) == (4, KV_HEADS)
    assert groups["strategy"] == "target" and groups["target_saving"] == 0.1 and 0.0 <= groups["delta"] <= 1.0
    assert groups["kv_saving"] == pytest.approx(spec.kv_saving(64, 4, 16)) and groups["kv_saving"] >= 0.1
    result = SimilarityResult.load(out / "similarity.npz")
    assert result.similarity.shape == (KV_HEADS, 4, 4) and result.num_sequences == 3 and result.seq_len == 64
    curve = ProximalImportance.load(out / "proximal_importance.json")
    assert curve.sizes == [8, 16, 32]
    for name in ("similarity.png", "similarity_heads.png", "proximal_importance.png"):
        assert _is_png(out / name)
    assert "head 0:" in capsys.readouterr().out


def _cli_error(args: list[str], capsys) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors_write_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    small = ["--n-sink", "4", "--n-recent", "16", "--n-queries", "8", "--seq-len", "64", "--quiet"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "w1 w2"}) + "\n" + "{not json\n")
    assert f"{bad}:2:" in _cli_error(
        ["--model", str(model_dir), "--data", str(bad), "--out", str(out), *small], capsys
    )
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"content": "w1"}) + "\n")
    assert f"{no_text}:1:" in _cli_error(
        ["--model", str(model_dir), "--data", str(no_text), "--out", str(out), *small], capsys
    )
    text = tmp_path / "calib.txt"
    text.write_text(_texts(1, 40)[0])
    assert "one calibration sequence needs --seq-len=64" in _cli_error(
        ["--model", str(model_dir), "--data", str(text), "--out", str(out), *small], capsys
    )
    base = ["--model", str(model_dir), "--data", str(text), "--out", str(out)]
    assert "must have at least n_sink + n_recent + n_queries = 28" in _cli_error(
        [*base, "--n-sink", "4", "--n-recent", "16", "--n-queries", "8", "--seq-len", "20"], capsys
    )
    assert "delta must be in [0, 1]" in _cli_error([*base, *small, "--delta", "2"], capsys)
    assert "the maximum is" in _cli_error(
        [*base, *small, "--strategy", "target", "--target-saving", "0.9"], capsys
    )
    assert "block_size must be an integer >= 1" in _cli_error(
        [*base, *small, "--strategy", "fixed", "--block-size", "0"], capsys
    )
    mistral = tmp_path / "mistral"
    MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).save_pretrained(mistral)
    assert "model_type 'mistral'" in _cli_error(
        ["--model", str(mistral), "--data", str(text), "--out", str(out), *small], capsys
    )
    assert not out.exists()


def test_cli_module_entry_point(tmp_path):
    data = tmp_path / "calib.csv"
    data.write_text("w1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pod.grouping",
            "--model",
            str(tmp_path),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")
