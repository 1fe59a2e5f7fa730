"""Benchmark the PoD model core against the source Llama (DynamicCache) in the same run.

Measures, per context length: prefill time, decode time per token, KV cache bytes, and a training
step (forward + backward). Every PoD number is printed as a ratio to the dense number measured
right before it, with the same weights, inputs and threads.

    python scripts/benchmark_core.py                       # CPU default: ~40M-param Llama, 2K/4K/8K
    python scripts/benchmark_core.py --seq-lens 2048 --repeats 2 --out docs/bench_core.json
    python scripts/benchmark_core.py --preset llama3_8b --device cuda --dtype bfloat16 --seq-lens 32768

Writes a JSON with every measurement when --out is given. ``--clock cpu`` times with the process's
CPU time instead of wall time: on a machine shared with other work, run it with ``--threads 1``
(CPU time of one thread hardly depends on what else runs; wall time does).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pod  # noqa: E402

PRESETS = {
    # ~40M parameters, Llama-3-like shape (GQA 2:1, head_dim 64) scaled down for a 2-core CPU.
    "cpu40m": dict(
        vocab_size=16000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "llama3_8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Median time of ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = CLOCK()
        result = fn()
        sync(device)
        times.append(CLOCK() - start)
    return statistics.median(times), result


def dense_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, object]:
    """Seconds per decoded token after a prefill (greedy, cache on)."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = CLOCK()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return (CLOCK() - start) / steps, cache


def train_step(model, ids: torch.Tensor) -> float:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu40m")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--train-seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--n-sink", type=int, default=16)
    parser.add_argument("--n-recent", type=int, default=496, help="default: 512 proximal tokens")
    parser.add_argument("--block-size", type=int, default=4, help="fixed blocks of this many layers")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    fields = dict(PRESETS[args.preset], max_position_embeddings=max(args.seq_lens + args.train_seq_lens) + 64)
    with torch.device(args.device):
        llama = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype).eval()
    cfg = llama.config
    spec = pod.GroupSpec.fixed(cfg.num_hidden_layers, cfg.num_key_value_heads, args.block_size)
    model = pod.convert_llama(
        llama, spec, n_sink=args.n_sink, n_recent=args.n_recent, attn_implementation=args.attn
    )
    params = sum(p.numel() for p in llama.parameters())
    print(
        f"# {args.preset}: {params / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_key_value_heads} KV heads; PoD blocks of {args.block_size}, n_sink={args.n_sink}, "
        f"n_recent={args.n_recent}, attention={args.attn}; {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, torch {torch.__version__}"
    )
    rows = []
    header = f"{'seq':>6} | {'metric':<18} | {'dense':>12} | {'PoD':>12} | {'PoD/dense':>9}"
    print(header)
    print("-" * len(header))

    def report(seq: int, metric: str, dense: float, pod_value: float, unit: str) -> None:
        ratio = pod_value / dense
        rows.append(dict(seq_len=seq, metric=metric, unit=unit, dense=dense, pod=pod_value, ratio=ratio))
        fmt = (lambda v: f"{v / 2**20:10.2f}Mi") if unit == "bytes" else (lambda v: f"{v * 1e3:10.1f}ms")
        print(f"{seq:>6} | {metric:<18} | {fmt(dense):>12} | {fmt(pod_value):>12} | {ratio:9.3f}")

    gen = torch.Generator().manual_seed(0)
    for seq in args.seq_lens:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(args.device)
        with torch.no_grad():
            t_dense, _ = timed(lambda ids=ids: llama(ids, use_cache=True), args.device, args.repeats)
            t_pod, _ = timed(lambda ids=ids: model(ids, use_cache=True), args.device, args.repeats)
        report(seq, "prefill", t_dense, t_pod, "s")
        d_dense, cache_dense = decode(llama, ids, args.decode_steps)
        d_pod, cache_pod = decode(model, ids, args.decode_steps)
        report(seq, "decode / token", d_dense, d_pod, "s")
        total = seq + args.decode_steps
        measured = cache_pod.nbytes()
        formula = pod.kv_cache_bytes(model.config, total, 1, dtype)
        assert measured == formula, f"PodCache holds {measured} bytes, the formula says {formula}"
        report(total, "KV cache bytes", dense_cache_bytes(cache_dense), measured, "bytes")
        del cache_dense, cache_pod
    for seq in args.train_seq_lens:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(args.device)
        t_dense, _ = timed(lambda ids=ids: train_step(llama, ids), args.device, args.repeats)
        t_pod, _ = timed(lambda ids=ids: train_step(model, ids), args.device, args.repeats)
        report(seq, "train step (f+b)", t_dense, t_pod, "s")
    print(
        f"KV saving by the formula at {args.seq_lens[-1]}: {spec.kv_saving(args.seq_lens[-1], args.n_sink, args.n_recent):.3f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            vars(args),
            out=str(args.out),
            params=params,
            torch=torch.__version__,
            machine=platform.processor(),
        )
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
