"""Issue 3's inference benchmark: each adapter workload timed interleaved with the base model
in one run, eager and under torch.compile, as a ratio to the base model's time.

    python benchmarks/infer_speed.py                 # a GPU: Llama-shaped 1.1B, bf16
    python benchmarks/infer_speed.py --small         # CPU smoke run: a 2-layer toy, float32
    python benchmarks/infer_speed.py --write         # also append to benchmarks/RESULTS.md
    python benchmarks/infer_speed.py --compile --shapes 8x512 --providers adaptc peft
                                                     # a subset (torch.compile takes a while)
    python benchmarks/infer_speed.py --compile reduce-overhead   # Inductor + CUDA graphs
    python benchmarks/infer_speed.py --cuda-graph    # eager kernels replayed from CUDA graphs

Model: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000 (random
init, seeded). Shapes batch×seq 1×1, 1×128, 8×512. Providers per workload: adaptc (infer
mode: LoRA merged, adapters/mixtures as fused custom ops; for the unmerged workloads
`merge=False`, LoRA as linear ops with one A GEMM per sibling group), "adaptc fused" (the
same with `fuse_projections=True`: q, k, v and gate, up as one GEMM each), "eager modules" (the
train-mode graph in eval: adapter modules as written), and PEFT where it has the method.
Besides the base model (the ratios' denominator), "base graph" times the base model's own
exported graph with no adapters, bound as the infer pipeline binds it (`bind_ops`): what the
graph module costs by itself.

`--cuda-graph` captures each forward (after a warm-up call) into a CUDA graph and times its
replays: the same kernels as eager, none of the host's per-op cost. On a host slower than the
GPU, eager times are host time; these are device time. A provider that cannot be captured (it
reads a tensor's value on the host) gets a row saying so.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from timing import seconds

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
WORKLOADS = {  # name: (spec, merge in infer mode, PEFT targets, rank and merge, or None)
    "LoRA all-linear r16, merged": (f"{ALL_LINEAR}: lora r=16 alpha=32", True,
                                    (ALL_LINEAR.split(","), 16, True)),
    "LoRA q,v r8 unmerged": ("q_proj,v_proj: lora r=8 alpha=16", False,
                             (["q_proj", "v_proj"], 8, False)),
    "LoRA all-linear r16 unmerged": (f"{ALL_LINEAR}: lora r=16 alpha=32", False,
                                     (ALL_LINEAR.split(","), 16, False)),
    "bottleneck 64 after attention and FFN": ("attn,ffn: adapter bottleneck=64", True, None),
    "mixture 8 experts top-2 r8 on q,v": ("q_proj,v_proj: lora r=8 alpha=16\n"
                                          "mixture moe k=2 experts=8", True, None),
    "MoV 8 vectors soft on k,v,down": ("k_proj,v_proj: ia3; down_proj: ia3 feedforward\n"
                                       "mixture moe router=soft experts=8", True, None),
}
SHAPES = [(1, 1), (1, 128), (8, 512)]


def base_model(small: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2) if small else
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22))
    config = LlamaConfig(vocab_size=32000, num_attention_heads=32 if not small else 4,
                         num_key_value_heads=4 if not small else 2, use_cache=False, **size)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def providers(model, spec: str, merge: bool, peft_cfg, scratch: Path,
              wanted: set[str] | None) -> dict:
    """name → callable(ids, mask) for one workload, adapters with random non-zero weights;
    only the `wanted` ones are built (all when None)."""
    import adaptc

    train = adaptc.compile(model, spec)
    with torch.no_grad():
        for p in adaptc.adapter_state_dict(train).values():
            p.normal_(0, 0.02)
    weights = adaptc.save_adapters(train, scratch / "a.safetensors")
    build = {"adaptc": lambda: adaptc.compile(model, spec, "infer", adapters=weights,
                                              merge=merge),
             "adaptc fused": lambda: adaptc.compile(model, spec, "infer", adapters=weights,
                                                    merge=merge, fuse_projections=True),
             "eager modules": train.eval}
    found = {k: make() for k, make in build.items() if wanted is None or k in wanted}
    if peft_cfg is not None and (wanted is None or "peft" in wanted):
        from peft import LoraConfig, get_peft_model
        targets, r, peft_merge = peft_cfg
        twin = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r,
                                                               target_modules=targets))
        twin = (twin.merge_and_unload() if peft_merge else twin).eval()
        found["peft"] = twin
    return found


def base_graph(model):
    """The base model traced and bound the way adaptc compiles it, no adapter inserted."""
    from adaptc.compiler import as_model
    from adaptc.frontend.trace import trace
    from adaptc.passes.bind_ops import bind_ops

    graph = trace(as_model(model, None))
    bind_ops(graph)
    return graph


@torch.no_grad()
def measure(model, workloads: dict, shapes, device: str, compiled: str | None, rounds: int,
            wanted: set[str] | None = None, cuda_graph: bool = False) -> list:
    """Rows (workload, provider, shape, seconds, × base), base timed next to each variant;
    each row is printed as soon as it is measured. `wanted`: the providers to time."""
    rows, graph = [], base_graph(model)
    uncapturable: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (spec, merge, peft_cfg) in workloads.items():
            variants = {"base graph": graph,
                        **providers(model, spec, merge, peft_cfg, Path(scratch), wanted)}
            variants = {k: v for k, v in variants.items() if wanted is None or k in wanted}
            for (batch, seq) in shapes:
                ids = torch.randint(0, 32000, (batch, seq), device=device)
                x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                runs = {"base": model, **variants}
                if compiled:
                    runs = {k: torch.compile(v, mode=compiled) for k, v in runs.items()}
                times = {k: [] for k in runs}
                for _ in range(rounds):  # interleaved: base, then each provider, per round
                    for key, fn in runs.items():
                        if key in uncapturable:
                            continue
                        try:
                            times[key].append(seconds(lambda fn=fn: fn(**x), device == "cuda",
                                                      graph=cuda_graph))
                        except RuntimeError as error:  # only a capture can fail here
                            if not cuda_graph or key == "base":
                                raise
                            uncapturable[key] = str(error).splitlines()[0][:80]
                            times[key] = []
                base = statistics.median(times["base"])
                for key in variants:
                    if key in uncapturable:
                        print(f"{name:40s} {key:14s} {batch}x{seq:<5d} not captured: "
                              f"{uncapturable[key]}", flush=True)
                        continue
                    t = statistics.median(times[key])
                    rows.append((name, key, f"{batch}x{seq}", t, t / base))
                    print(f"{name:40s} {key:14s} {batch}x{seq:<5d} {t * 1e3:9.3f} ms  "
                          f"× base {t / base:5.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="CPU smoke run on a toy model")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        help="time under torch.compile (its mode: default, reduce-overhead "
                             "for CUDA graphs, max-autotune)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time replays of each forward captured into a CUDA graph")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--shapes", nargs="+", metavar="BxS", help="e.g. 1x1 8x512")
    parser.add_argument("--providers", nargs="+", help="time only these besides the base model "
                        "(base graph, adaptc, adaptc fused, eager modules, peft)")
    parser.add_argument("--workloads", nargs="+", metavar="WORD",
                        help="only workloads whose name contains one of these words")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if args.cuda_graph and (device != "cuda" or args.compile):
        parser.error("--cuda-graph needs a CUDA device and eager mode (for torch.compile "
                     "with CUDA graphs: --compile reduce-overhead)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = base_model(args.small, device, dtype)
    shapes = ([tuple(map(int, shape.split("x"))) for shape in args.shapes] if args.shapes
              else SHAPES[:2] if args.small else SHAPES)
    workloads = {k: v for k, v in WORKLOADS.items()
                 if not args.workloads or any(word in k for word in args.workloads)}
    rows = measure(model, workloads, shapes, device, args.compile, args.rounds,
                   set(args.providers) if args.providers else None, args.cuda_graph)
    if args.write:
        write(rows, device, dtype, args)


def mode(args) -> str:
    if args.compile:
        return f"torch.compile mode={args.compile}"
    return "eager, replayed from CUDA graphs" if args.cuda_graph else "eager"


def write(rows, device: str, dtype, args) -> None:
    import transformers
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    lines = [f"\n## infer_speed.py — {datetime.date.today()}",
             f"Device: {device} ({name}). torch {torch.__version__}, transformers "
             f"{transformers.__version__}, {dtype}, {mode(args)}"
             f", {'toy 2-layer model' if args.small else 'Llama-shaped 1.1B'}; median of "
             f"{args.rounds} interleaved rounds.\n",
             "| workload | provider | batch×seq | ms | × base |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {s} | {t * 1e3:.3f} | {r:.2f} |" for n, k, s, t, r in rows]
    with Path(__file__).with_name("RESULTS.md").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
