"""Host time per forward pass and per decoding step: what a graph costs beyond its kernels.

The GPU run of infer_speed.py (RESULTS.md, H200) showed eager 1.1B timings of ~23 ms at
1×1 and at 8×512 alike: launch- and host-bound, with the traced base graph alone at 1.1–1.6×
the Hugging Face model. This script measures that host time on any machine: a Llama with the
1.1B model's 22 layers but hidden size 64 makes every kernel tiny, so a forward's time is
the time spent calling ops. Each row is timed interleaved with the eager model in one run.

    python benchmarks/host_overhead.py [--rounds 5] [--tokens 32] [--write]
    python benchmarks/host_overhead.py --device cuda  # launch + host time on a GPU

Forward rows (batch 1 × 1 token, float32): the eager HF model; its traced graph as exported
(aten overloads); the same graph after `bind_ops`; and the infer-mode graphs of
infer_speed.py's workloads (bound, as `adaptc.compile` returns them). Decoding rows: greedy
tokens/s over a 4-token prompt, for transformers' `generate` (eager, dynamic cache), and
for one saved cached decoder (decoding/decoder.pt2, merged LoRA r8 on q,v) loaded as saved
(aten ops) and loaded through `load_decoding` (bound; on CUDA also with its one-token steps
replayed from a CUDA graph, `cuda_graph=True`). On the CPU the fused ops' rows time
their PyTorch reference (with its arithmetic: these rows also vary between runs by up to
~1.7×, unlike the others), on CUDA their Triton kernels' launches.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from infer_speed import WORKLOADS as INFER_WORKLOADS
from infer_speed import base_graph
from timing import seconds

LAYERS, VOCAB = 22, 256
WORKLOADS = {  # infer_speed.py's workloads: spec, merge, and fuse_projections
    name: (*INFER_WORKLOADS[workload][:2], fuse) for name, workload, fuse in (
        ("LoRA all-linear r16, merged", "LoRA all-linear r16, merged", False),
        ("LoRA all-linear r16 unmerged", "LoRA all-linear r16 unmerged", False),
        ("LoRA all-linear r16 unmerged, fused projections", "LoRA all-linear r16 unmerged",
         True),
        ("bottleneck 64 after attention and FFN", "bottleneck 64 after attention and FFN",
         False),
        ("mixture 8 experts top-2 r8 on q,v", "mixture 8 experts top-2 r8 on q,v", False))}


def narrow_llama(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


# ops that only make views or read shapes: no kernel on a GPU
METADATA = {"view", "reshape", "unsqueeze", "squeeze", "transpose", "permute", "expand", "slice",
            "select", "split", "split_with_sizes", "alias", "t", "sym_size", "getitem",
            "_guards_fn"}


def calls(graph) -> tuple[int, int]:
    """(calls the generated code makes, those of them that compute: a GPU's launches, counting
    a fused op as one)."""
    from adaptc.passes.bind_ops import aten_op

    called = [n for n in graph.graph.nodes
              if n.op in ("call_function", "call_method", "call_module")]
    names = [n.target if n.op == "call_module" else
             getattr(aten_op(n), "_opname", getattr(aten_op(n), "__name__", "")) for n in called]
    return len(called), sum(name not in METADATA for name in names)


def forward_variants(model) -> dict[str, torch.nn.Module]:
    import adaptc
    from adaptc.compiler import as_model
    from adaptc.frontend.trace import trace

    found = {"graph, aten ops": trace(as_model(model, None)), "graph, bound": base_graph(model)}
    for name, (spec, merge, fuse) in WORKLOADS.items():
        found[f"adaptc: {name}"] = adaptc.compile(model, spec, "infer", merge=merge,
                                                  fuse_projections=fuse)
    return found


def decoders(model, scratch: Path, cache: int) -> dict[str, Callable[[int], object]]:
    """name → generate(n new tokens) for the decoding rows."""
    from adaptc.decode import Decoder, compile_decoder
    from adaptc.decoding_program import load_decoding, save_decoding
    from adaptc.export import load_program

    save_decoding(compile_decoder(model, "q_proj,v_proj: lora r=8", max_cache_len=cache),
                  scratch / "decoding")
    saved = Decoder(load_program(scratch / "decoding" / "decoder.pt2").module(), cache, VOCAB)
    bound = load_decoding(scratch / "decoding")
    prompt = torch.tensor([[1, 2, 3, 4]], device=model.device)
    found = {
        "transformers generate": lambda n: model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, use_cache=True, pad_token_id=0),
        "saved decoder, aten ops": lambda n: saved.generate([1, 2, 3, 4], n),
        "saved decoder, bound": lambda n: bound.generate([1, 2, 3, 4], n)}
    if model.device.type == "cuda":
        graphed = load_decoding(scratch / "decoding", cuda_graph=True)
        found["saved decoder, bound, CUDA graph steps"] = \
            lambda n: graphed.generate([1, 2, 3, 4], n)
    return found


@torch.no_grad()
def measure(rounds: int, tokens: int, device: str) -> tuple[list, list]:
    model = narrow_llama(device)
    ids = torch.randint(0, VOCAB, (1, 1), device=device)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    variants = forward_variants(model)
    runs = {"HF eager": model, **variants}
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key].append(seconds(lambda fn=fn: fn(**x), device == "cuda"))
    base = statistics.median(times["HF eager"])
    forward = [(key, calls(variants[key]) if key in variants else ("", ""),
                statistics.median(t), statistics.median(t) / base) for key, t in times.items()]
    for key, (n, k), t, ratio in forward:
        print(f"{key:52s} {n:>6} calls {k:>6} computing {t * 1e3:8.3f} ms  × eager {ratio:5.2f}",
              flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        generate = decoders(model, Path(scratch), tokens + 8)
        rates = {k: [] for k in generate}
        for _ in range(rounds):
            for key, fn in generate.items():
                # wall time: each call waits for its tokens (stopping checks, token lists)
                rates[key].append(tokens / seconds(lambda fn=fn: fn(tokens), False, repeat=3))
    first = statistics.median(rates["transformers generate"])
    decoding = [(key, statistics.median(r), statistics.median(r) / first)
                for key, r in rates.items()]
    for key, rate, ratio in decoding:
        print(f"{key:52s} {rate:9.1f} tok/s  × generate {ratio:5.2f}", flush=True)
    return forward, decoding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # host time of one thread calling ops, as a GPU's host thread
    forward, decoding = measure(args.rounds, args.tokens, args.device)
    if args.write:
        write(forward, decoding, args)


def write(forward, decoding, args) -> None:
    import transformers
    if args.device == "cuda":
        import triton
        where = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
                 f"{triton.__version__}")
        timer, ops = "triton's do_bench median", "Fused ops ran their Triton kernels."
    else:
        where = f"CPU ({platform.machine()}, 1 thread), torch {torch.__version__}"
        timer, ops = "fastest of 20 calls", "Fused ops ran their PyTorch reference (no GPU)."
    lines = [f"\n## host_overhead.py — {datetime.date.today()}",
             f"Device: {where}, transformers {transformers.__version__}, float32. Llama with "
             f"{LAYERS} layers, hidden 64, vocab {VOCAB}: kernels are tiny, times are host "
             f"time. Forward: 1×1, {timer} per round, median of {args.rounds} interleaved "
             f"rounds. Decoding: 4-token prompt, {args.tokens} new tokens, greedy. {ops}\n",
             "| forward | calls | computing | ms | × HF eager |", "|---|---|---|---|---|"]
    lines += [f"| {key} | {n} | {k} | {t * 1e3:.3f} | {r:.2f} |"
              for key, (n, k), t, r in forward]
    lines += ["", "| decoding | tokens/s | × transformers generate |", "|---|---|---|"]
    lines += [f"| {k} | {rate:.1f} | {r:.2f} |" for k, rate, r in decoding]
    with Path(__file__).with_name("RESULTS.md").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
