"""Decode tokens/s of infer-mode KV-cache decoders next to the base model's, interleaved in
one run. The base row is LoRA with B = 0 merged: after merging its graph has exactly the
base model's operations and weights (tests/test_infer.py), so it is the base model through
the same exported static-cache path.

    python benchmarks/decode.py [--model llama] [--tokens 64] [--rounds 3] [--write]
    python benchmarks/decode.py --model 1.1b     # on a GPU: infer_speed.py's model, bf16
    python benchmarks/decode.py --torch-compile  # every decoder through torch.compile
    python benchmarks/decode.py --model 1.1b --cuda-graph  # steps replayed from CUDA graphs

`--model` takes a preset or checkpoint directory (run on the CPU, float32), or `1.1b`: the
Llama-shaped 1.1B model of infer_speed.py, random init, bfloat16 on CUDA when there is one.

Variants: base (LoRA r=8 on q,v with B=0, merged: the base model's operations), LoRA merged
(random adapters), LoRA unmerged (`merge=False`) with and without `fuse_projections`,
bottleneck adapters fused, mixture fused. On a CPU without TRITON_INTERPRET the fused ops
run their PyTorch reference; on CUDA, Triton kernels.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

QV = "q_proj,v_proj: lora r=8"
VARIANTS = {  # name: (spec, random adapters, compile_decoder options)
    "base (merged zero LoRA)": (QV, False, {}),
    "LoRA q,v r8 merged": (QV, True, {}),
    "LoRA q,v r8 unmerged": (QV, True, {"merge": False}),
    "LoRA q,v r8 unmerged, fused projections": (QV, True, {"merge": False,
                                                           "fuse_projections": True}),
    "bottleneck 64 on attn.o, ffn (fused)": ("attn.o,ffn: adapter bottleneck=64", True, {}),
    "mixture 8 experts top-2 r8 on q,v (fused)": (f"{QV}; mixture moe k=2 experts=8", True, {}),
}


def load_base(model_name: str):
    """(model, device, dtype) for `--model`."""
    from adaptc.frontend.models import load_model
    if model_name != "1.1b":
        return load_model(model_name), "cpu", torch.float32
    from infer_speed import base_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return base_model(False, device, dtype), device, dtype


def decoders(model, cache: int, torch_compile: bool, cuda_graph: bool) -> dict:
    import adaptc
    from adaptc.decode import compile_decoder

    built = {}
    for name, (spec, random, options) in VARIANTS.items():
        trained = adaptc.compile(model, spec)
        if random:
            with torch.no_grad():
                for p in adaptc.adapter_state_dict(trained).values():
                    p.normal_(0, 0.02)
        path = Path(tempfile.mkdtemp()) / "a.safetensors"
        adaptc.save_adapters(trained, path)
        start = time.perf_counter()
        built[name] = compile_decoder(model, spec, adapters=path, max_cache_len=cache,
                                      torch_compile=torch_compile, cuda_graph=cuda_graph,
                                      **options)
        built[name].generate([1, 2, 3, 4], 2)  # warm-up: kernels (and torch.compile) build here
        print(f"built {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return built


def tokens_per_second(decoder, new_tokens: int) -> float:
    start = time.perf_counter()
    decoder.generate([1, 2, 3, 4], new_tokens)
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay one-token steps from a CUDA graph (on CUDA)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    model, device, dtype = load_base(args.model)
    built = decoders(model, args.tokens + 8, args.torch_compile, args.cuda_graph)
    rates = {name: [] for name in built}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for name, decoder in built.items():
            rates[name].append(tokens_per_second(decoder, args.tokens))
    base = statistics.median(rates[next(iter(rates))])
    rows = [(name, statistics.median(r), base / statistics.median(r)) for name, r in rates.items()]
    for name, rate, ratio in rows:
        print(f"{name:44s} {rate:9.1f} tok/s  time × base {ratio:5.2f}")
    if args.write:
        write(rows, args, device, dtype)


def write(rows, args, device: str, dtype: torch.dtype) -> None:
    import transformers
    if device == "cuda":
        import triton
        where = (f"{torch.cuda.get_device_name()}. torch {torch.__version__}, triton "
                 f"{triton.__version__}")
        ops = "Fused ops ran their Triton kernels."
    else:
        where = (f"CPU ({platform.machine()}, {torch.get_num_threads()} threads). torch "
                 f"{torch.__version__}")
        ops = "Fused ops ran their PyTorch reference (no GPU)."
    lines = [f"\n## decode.py — {datetime.date.today()}",
             f"Device: {where}, transformers {transformers.__version__}, {dtype}. Model "
             f"`{args.model}`{', torch.compile' if args.torch_compile else ', eager'}"
             f"{', steps replayed from CUDA graphs' if args.cuda_graph else ''}, batch 1, "
             f"prompt 4 tokens, {args.tokens} new tokens, greedy; "
             f"median of {args.rounds} interleaved rounds. {ops}\n",
             "| variant | tokens/s | time × base |", "|---|---|---|"]
    lines += [f"| {n} | {r:.1f} | {x:.2f} |" for n, r, x in rows]
    path = Path(__file__).with_name("RESULTS.md")
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
