"""The PoD model core: equivalences, attention paths, cache bytes, generation, conversion errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import pod
from pod.modeling_pod_llama import PodMaskInfo, pod_eager_attention, pod_flex_attention, pod_sdpa_attention

LAYERS, KV_HEADS = 6, 2
# Per-head blocks that differ between heads, with a layer (3) that anchors head 0 but not head 1.
MIXED = pod.GroupSpec.from_block_starts([[0, 2, 3], [0, 1, 4]], LAYERS)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 96), generator=torch.Generator().manual_seed(1))


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


# ------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_every_layer_its_own_anchor_is_the_source_llama(llama, ids, impl):
    model = pod.convert_llama(
        llama, pod.GroupSpec.identity(LAYERS, KV_HEADS), n_sink=4, n_recent=8, attn_implementation=impl
    )
    assert (logits(model, ids) - logits(llama, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["anchor", "mean"])
def test_window_covering_the_sequence_is_the_source_llama(llama, ids, mode):
    model = pod.convert_llama(
        llama, pod.GroupSpec.fixed(LAYERS, KV_HEADS, 3), n_sink=4, n_recent=96, shared_key_init=mode
    )
    assert (logits(model, ids) - logits(llama, ids)).abs().max() <= 1e-5


def test_sharing_changes_the_output_and_adds_no_parameters(llama, ids):
    model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8)
    assert (logits(model, ids) - logits(llama, ids)).abs().max() > 1e-3
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in llama.parameters())


def test_pod_disabled_is_the_source_llama(llama, ids):
    model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8)
    with model.pod_disabled():
        assert (logits(model, ids) - logits(llama, ids)).abs().max() <= 1e-5
    assert (logits(model, ids) - logits(llama, ids)).abs().max() > 1e-3


def test_twin_layers_sharing_keys_are_the_source_llama(ids):
    """METHOD.md's testing note: a layer whose o_proj and down_proj are zero leaves the residual
    stream unchanged, so an identical next layer sees the same input and has the same keys. Blocks
    of such twins then compute exactly the dense model — but only if each layer borrows the keys of
    its own block's anchor."""
    llama = tiny_llama(seed=4)
    layers = llama.model.layers
    with torch.no_grad():
        for first in (0, 2, 4):
            layers[first + 1].load_state_dict(layers[first].state_dict())
            layers[first].self_attn.o_proj.weight.zero_()
            layers[first].mlp.down_proj.weight.zero_()
    twins = pod.convert_llama(llama, pod.GroupSpec.fixed(LAYERS, KV_HEADS, 2), n_sink=2, n_recent=4)
    assert (logits(twins, ids) - logits(llama, ids)).abs().max() <= 1e-5
    # Layer 3 borrowing layer 1's keys (blocks [0] [1-3] [4] [5]) changes the output.
    straddle = pod.convert_llama(
        llama, pod.GroupSpec.from_block_starts([[0, 1, 4, 5]] * 2, LAYERS), n_sink=2, n_recent=4
    )
    assert (logits(straddle, ids) - logits(llama, ids)).abs().max() > 1e-4


# ---------------------------------------------------------------------------- attention paths


def _random_attention_inputs(seed=0, b=2, hq=4, h=2, t=48, s=48, d=16, packed=False, padded=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k_own = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k_dist = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k_pos = torch.arange(s).expand(b, s).clone()
    k_valid = None
    if packed:  # row 0: documents of 20 and 28 tokens
        k_pos[0, 20:] = torch.arange(s - 20)
    if padded:  # row 1: 5 slots of left padding
        k_valid = torch.ones(b, s, dtype=torch.bool)
        k_valid[1, :5] = False
        k_pos[1, 5:] = torch.arange(s - 5)
        k_pos[1, :5] = 1
    k_doc = (k_pos == 0).long().cumsum(1)
    if not bool((k_doc != k_doc[:, -1:]).any()):
        k_doc = None
    info = PodMaskInfo(q_pos=k_pos[:, s - t :], k_pos=k_pos, k_valid=k_valid, k_doc=k_doc)
    return q, k_own, k_dist, v, info


def _brute_force(q, k_own, k_dist, v, info, n_sink, n_recent, v_dist=None):
    """Loops over every query and key: the definition of METHOD.md section 2, written out.
    ``k_dist`` None drops distant keys; ``v_dist`` shares distant values too (the baselines)."""
    b, hq, t, d = q.shape
    h, s = k_own.shape[1], k_own.shape[2]
    out = torch.zeros(b, t, hq, d, dtype=q.dtype)
    for bi in range(b):
        for head in range(hq):
            kv = head // (hq // h)
            for i in range(t):
                slot = s - t + i
                scores, vals = [], []
                for j in range(slot + 1):
                    if info.k_valid is not None and not info.k_valid[bi, j] and j != slot:
                        continue
                    if info.k_doc is not None and info.k_doc[bi, j] != info.k_doc[bi, slot]:
                        continue
                    prox = info.k_pos[bi, j] < n_sink or info.q_pos[bi, i] - info.k_pos[bi, j] < n_recent
                    if not prox and k_dist is None:
                        continue
                    key = k_own[bi, kv, j] if prox else k_dist[bi, kv, j]
                    scores.append(q[bi, head, i] @ key / d**0.5)
                    vals.append(v[bi, kv, j] if prox or v_dist is None else v_dist[bi, kv, j])
                p = torch.softmax(torch.stack(scores), 0)
                out[bi, i, head] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("policy", ["shared", "shared_kv", "drop"])
@pytest.mark.parametrize("case", [{}, {"packed": True}, {"padded": True}, {"t": 7, "s": 48}])
def test_attention_paths_match_the_definition(case, policy):
    q, k_own, k_dist, v, info = _random_attention_inputs(**case)
    v_dist = torch.randn_like(v) if policy == "shared_kv" else None
    k_dist = None if policy == "drop" else k_dist
    n_sink, n_recent = 3, 9
    want = _brute_force(q, k_own, k_dist, v, info, n_sink, n_recent, v_dist)
    kw = dict(n_sink=n_sink, n_recent=n_recent, scaling=q.shape[-1] ** -0.5, v_dist=v_dist)
    for fn, extra in [
        (pod_eager_attention, {}),
        (pod_sdpa_attention, {"chunk_size": 5}),
        (pod_sdpa_attention, {"chunk_size": 64}),
    ]:
        got = fn(q, k_own, k_dist, v, info, **kw, **extra)
        assert (got - want).abs().max() < 1e-10, fn.__name__
    with torch.no_grad():
        f32 = [None if x is None else x.float() for x in (q, k_own, k_dist, v, v_dist)]
        kw["v_dist"] = f32[4]
        got = pod_flex_attention(*f32[:4], info, **kw)
    assert (got.double() - want).abs().max() < 1e-5


def test_sdpa_gradients_match_the_reference(llama, ids):
    grads = {}
    for impl in ["eager", "sdpa"]:
        model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8, attn_implementation=impl, chunk_size=16)
        model.train()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["eager"].items():
        assert (g - grads["sdpa"][name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("mode", ["anchor", "mean"])
def test_gradient_checkpointing_keeps_the_anchor_gradients(llama, ids, mode):
    model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8, shared_key_init=mode)
    model.train()
    model(ids, labels=ids, use_cache=False).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad - plain[name]).abs().max() <= 1e-6, name
    # The anchor's k_proj gets gradient from the layers that borrow its keys.
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_packed_documents_equal_separate_documents(llama):
    model = pod.convert_llama(llama, MIXED, n_sink=3, n_recent=6)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, 128, (1, 30), generator=g), torch.randint(3, 128, (1, 25), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(30), torch.arange(25)])[None]
    out = logits(model, packed, position_ids=positions)
    assert (out[:, :30] - logits(model, a)).abs().max() <= 1e-5
    assert (out[:, 30:] - logits(model, b)).abs().max() <= 1e-5
    with torch.no_grad():  # a cache prefilled from packed rows gives the same logits ...
        first = model(packed, position_ids=positions, use_cache=True)
        assert (first.logits - out).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="packed rows"):  # ... but refuses to be continued
            model(packed[:, :1], position_ids=torch.tensor([[25]]), past_key_values=first.past_key_values)


# ------------------------------------------------------------------------------------- cache


VARIANTS = [
    {"shared_key_init": "anchor"},
    {"shared_key_init": "mean"},
    {"distant_policy": "shared_kv"},
    {"distant_policy": "drop"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: next(iter(v.values())))
@pytest.mark.parametrize("seq_len", [3, 10, 40, 96])
def test_cache_bytes_equal_the_formula(llama, ids, variant, seq_len):
    model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8, **variant)
    with torch.no_grad():
        cache = model(ids[:, :seq_len], use_cache=True).past_key_values
    assert cache.nbytes() == pod.kv_cache_bytes(model.config, seq_len, batch_size=2, dtype=torch.float32)
    # Dropped keys are really freed: no stored tensor is a view of a larger buffer.
    for layer in cache.layers:
        for t in layer.tensors():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_cache_bytes_formula_against_dense_and_the_paper_formula(llama):
    dense = pod.kv_cache_bytes(llama.config, 1000, batch_size=3, dtype=torch.bfloat16)
    assert dense == 2 * LAYERS * KV_HEADS * 1000 * 16 * 3 * 2
    model = pod.convert_llama(llama, MIXED, n_sink=4, n_recent=8)
    n, n_d = 1000, 1000 - 12
    expected_ratio = 1 - (n_d / (2 * n)) * (1 - MIXED.num_anchors / (LAYERS * KV_HEADS))
    got = pod.kv_cache_bytes(model.config, n, batch_size=3, dtype=torch.bfloat16)
    assert got == pytest.approx(dense * expected_ratio, rel=1e-12)
    assert 1 - got / dense == pytest.approx(MIXED.kv_saving(n, 4, 8), rel=1e-12)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: next(iter(v.values())))
def test_greedy_generation_with_cache_equals_recomputation(llama, variant):
    model = pod.convert_llama(llama, MIXED, n_sink=3, n_recent=5, **variant)
    prompt = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    kw = dict(max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kw)
    uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 52  # 40 new tokens: the window (5) is crossed many times
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("policy", ["shared", "drop"])
def test_left_padded_batch_equals_each_prompt_alone(llama, policy):
    model = pod.convert_llama(llama, MIXED, n_sink=3, n_recent=5, distant_policy=policy)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (14, 9, 11)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)[0, len(p) :]
        assert torch.equal(together[i], alone), i


def test_sampling_and_beam_search_run_on_the_pod_cache(llama):
    model = pod.convert_llama(llama, MIXED, n_sink=3, n_recent=5)
    prompt = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, do_sample=True, top_k=20, max_new_tokens=15, eos_token_id=None, pad_token_id=0
    )
    assert sampled.shape == (2, 25)
    kw = dict(num_beams=3, do_sample=False, max_new_tokens=15, eos_token_id=None, pad_token_id=0)
    beams = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(beams, model.generate(prompt, use_cache=False, **kw))


# -------------------------------------------------------------------------------- conversion


def test_conversion_copies_weights_and_mean_init(llama):
    spec = pod.GroupSpec.fixed(LAYERS, KV_HEADS, 3)
    model = pod.convert_llama(llama, spec, n_sink=4, n_recent=8, shared_key_init="mean", dtype=torch.float64)
    assert model.dtype == torch.float64
    src = llama.model.layers
    assert torch.equal(model.model.layers[4].mlp.up_proj.weight, src[4].mlp.up_proj.weight.double())
    d = model.config.head_dim
    shared = model.model.layers[3].self_attn.shared_k_proj.weight
    for slot, head in enumerate(model.model.layers[3].self_attn.anchor_heads):
        rows = slice(head * d, (head + 1) * d)
        mean = torch.stack([src[m].self_attn.k_proj.weight[rows] for m in (3, 4, 5)]).mean(0)
        assert torch.allclose(shared[slot * d : (slot + 1) * d], mean.double(), atol=1e-7)
    assert not hasattr(model.model.layers[4].self_attn, "shared_k_proj")


def test_conversion_from_a_local_folder(llama, tmp_path, ids):
    llama.save_pretrained(tmp_path / "llama")
    model = pod.convert_llama(
        tmp_path / "llama", pod.GroupSpec.identity(LAYERS, KV_HEADS), n_sink=2, n_recent=4
    )
    assert (logits(model, ids) - logits(llama, ids)).abs().max() <= 1e-5
    spec_file = tmp_path / "groups.json"
    MIXED.save(spec_file, strategy="test")
    assert pod.GroupSpec.load(spec_file) == MIXED
    assert pod.convert_llama(llama, spec_file, n_sink=2, n_recent=4).config.anchors == [
        list(r) for r in MIXED.anchors
    ]


@pytest.mark.parametrize(
    ("groups", "kwargs", "message"),
    [
        ([[0, 0], [2, 1]] + [[i, i] for i in range(2, LAYERS)], {}, "at or below"),
        ([[0, 0], [0, 0], [0, 0], [0, 0], [0, 0], [1, 0]], {}, "consecutive"),
        ([[0, 0]] * 1, {}, "6 layers"),
        ([[i, i, i] for i in range(LAYERS)], {}, "KV heads"),
        ([[-1, 0]] + [[i, i] for i in range(1, LAYERS)], {}, "anchor must be a layer"),
        (None, {"n_sink": -1}, "n_sink"),
        (None, {"n_recent": 0}, "n_recent"),
        (None, {"shared_key_init": "median"}, "shared_key_init"),
    ],
)
def test_conversion_errors(llama, groups, kwargs, message):
    groups = groups if groups is not None else pod.GroupSpec.identity(LAYERS, KV_HEADS)
    settings = {"n_sink": 2, "n_recent": 4, **kwargs}
    with pytest.raises(pod.ConversionError, match=message):
        pod.convert_llama(llama, groups, **settings)


def test_conversion_rejects_non_llama_models_and_missing_paths(tmp_path):
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(pod.ConversionError, match="mistral"):
        pod.convert_llama(mistral, pod.GroupSpec.identity(2, 1), n_sink=1, n_recent=2)
    mistral.save_pretrained(tmp_path / "mistral")
    with pytest.raises(pod.ConversionError, match="model_type is 'mistral'"):
        pod.convert_llama(tmp_path / "mistral", pod.GroupSpec.identity(2, 1), n_sink=1, n_recent=2)
    with pytest.raises(pod.ConversionError, match="not found"):
        pod.convert_llama(tmp_path / "nothing-here", pod.GroupSpec.identity(2, 1), n_sink=1, n_recent=2)


# ---------------------------------------------------------------------------------- chunked loss


class _LargestLogits(TorchDispatchMode):
    """Largest number of elements of any tensor with a vocabulary-sized last dimension."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.numel = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab:
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("num_items_in_batch", [None, 150])
def test_chunked_loss_is_the_standard_loss_without_the_full_logits(num_items_in_batch):
    # A vocabulary no other dimension has; a chunk that does not divide 96 and whose logits (2 x 40
    # rows) outnumber the rows of the lm_head weight's transpose (64 x 512), also vocabulary-wide.
    vocab, chunk = 512, 40
    source = tiny_llama(vocab_size=vocab)
    ids = torch.randint(3, vocab, (2, 96), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :10] = -100  # masked positions (document starts, padding) are skipped by both
    labels[1, 50:] = -100
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    runs = {}
    for size in (0, chunk):
        model = pod.convert_llama(copy.deepcopy(source), MIXED, n_sink=4, n_recent=8)
        model.config.loss_chunk_size = size
        model.train()
        with _LargestLogits(vocab) as probe:
            out = model(ids, labels=labels, use_cache=False, **extra)
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        runs[size] = (out, grads, probe.numel)
    (plain, plain_grads, plain_numel), (chunked, chunked_grads, chunked_numel) = runs[0], runs[chunk]
    assert torch.allclose(chunked.loss, plain.loss, atol=1e-6, rtol=0)
    for name, grad in plain_grads.items():
        assert torch.allclose(chunked_grads[name], grad, atol=1e-6, rtol=1e-5), name
    assert plain_numel >= 2 * 96 * vocab  # the standard loss holds the whole logits tensor ...
    assert chunked_numel <= 2 * chunk * vocab  # ... the chunked one one chunk of it, forward and backward
    assert chunked.logits is None and plain.logits.shape == (2, 96, vocab)
    model.eval()  # not in training: the standard path, logits returned
    with torch.no_grad():
        assert model(ids, labels=labels, use_cache=False).logits.shape == (2, 96, vocab)


def test_a_negative_loss_chunk_size_is_refused():
    with pytest.raises(ValueError, match="loss_chunk_size must be >= 0"):
        pod.PodLlamaConfig(num_hidden_layers=2, num_key_value_heads=2, loss_chunk_size=-1)
