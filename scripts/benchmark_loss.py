"""Benchmark the chunked cross-entropy (``loss_chunk_size``) against the standard loss in the same run.

One training step (forward + backward) of a PoD Llama with Llama-3's 128,256-token vocabulary, where
the logits dominate memory. Each variant runs in a fresh process so that its peak memory is its own:
on CPU the growth of the process's peak resident set size during the steps, on CUDA
``torch.cuda.max_memory_allocated`` above what the model held before. Times are the median step.

    python scripts/benchmark_loss.py                                   # CPU: 4096 tokens, chunks 0 / 2048 / 512
    python scripts/benchmark_loss.py --device cuda --dtype bfloat16 --seq-len 32768 --hidden 4096 --layers 2

Prints every chunked figure as a ratio to the standard loss (``chunk 0``) and writes a JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_variant(args: argparse.Namespace) -> dict:
    """Build the model, run the steps, return this process's figures (runs in a child process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import pod

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq_len,
    )
    llama = LlamaForCausalLM(config).to(dtype)
    spec = pod.GroupSpec.fixed(args.layers, config.num_key_value_heads, args.layers)
    model = pod.convert_llama(llama, spec, n_sink=16, n_recent=min(1024, args.seq_len // 4)).to(args.device)
    model.config.loss_chunk_size = args.chunk
    model.train()
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _peak_rss_bytes()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {
        "chunk": args.chunk,
        "loss": loss.item(),
        "step_seconds": statistics.median(times),
        "peak_bytes_above_model": peak - before,
        "memory": "cuda max_memory_allocated" if cuda else "peak RSS growth",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 512], help="0 = the standard loss")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process: one chunk
    args = parser.parse_args(argv)
    if args.chunks[0] != 0:
        parser.error("--chunks must start with 0 (the standard loss, the baseline of the ratios)")
    if args.one is not None:
        args.chunk = args.one
        print(json.dumps(one_variant(args)))
        return 0

    forwarded = list(argv if argv is not None else sys.argv[1:])
    rows = []
    for chunk in args.chunks:
        child = subprocess.run(
            [sys.executable, __file__, *forwarded, "--one", str(chunk)], capture_output=True, text=True
        )
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"{args.seq_len} tokens, vocabulary {args.vocab:,}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.dtype} on {args.device}, {args.threads} threads; memory = {base['memory']}"
    )
    print("| loss_chunk_size | loss | step s | vs standard | peak memory above the model | vs standard |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        row["time_ratio"] = row["step_seconds"] / base["step_seconds"]
        # A tiny shape may not grow the peak RSS at all: no ratio then.
        base_bytes = base["peak_bytes_above_model"]
        row["memory_ratio"] = row["peak_bytes_above_model"] / base_bytes if base_bytes > 0 else float("nan")
        print(
            f"| {row['chunk'] or 'standard'} | {row['loss']:.6f} | {row['step_seconds']:.2f} | "
            f"{row['time_ratio']:.2f}x | {row['peak_bytes_above_model'] / 2**30:.2f} GiB | {row['memory_ratio']:.2f}x |"
        )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "one")}
        machine = f"{platform.machine()}, torch {torch.__version__}"
        Path(args.out).write_text(
            json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
