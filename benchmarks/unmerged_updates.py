"""A/B of `accumulate_updates`: all-linear LoRA, unmerged and merged, each compiled with and
without the pass, timed interleaved with the base model in one run, as ratios to the base
model's time.

    python benchmarks/unmerged_updates.py [--tokens 8x256] [--hidden 512] [--write]

Model: a Llama with 4 layers of the given width (intermediate 2.75×), random init; LoRA r16
on all seven projections, random non-zero weights. "without" compiles the same spec with the
pass replaced by one that changes nothing: unmerged, each B GEMM writes its update and an
add sums it with the base output; merged and unmerged, each residual add reads the stream
and o_proj's / down_proj's output back (the graphs before this pass existed). The pass adds
a LoRA site's two GEMMs in one of two orders (`accumulate_updates.INTO_SHORTER_ON`: by
device); "B GEMM into y" and "base GEMM into u" compile each: the base GEMM writes y and the
B GEMM (K = r) adds into it, or the B GEMM writes u and the base GEMM adds into that.
"""
import argparse
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from timing import seconds

import adaptc
from adaptc.passes import accumulate_updates
from adaptc.passes.base import PassResult

SPEC = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj: lora r=16 alpha=32"


def variants(model, scratch: Path) -> dict:
    train = adaptc.compile(model, SPEC)
    with torch.no_grad():
        for p in adaptc.adapter_state_dict(train).values():
            p.normal_(0, 0.02)
    weights = adaptc.save_adapters(train, scratch / "a.safetensors")

    def both(with_pass: str) -> dict:
        return {f"{kind}, {with_pass}": adaptc.compile(model, SPEC, "infer", adapters=weights,
                                                       merge=kind == "merged")
                for kind in ("unmerged", "merged")}

    found = both("with the pass")
    default = accumulate_updates.INTO_SHORTER_ON
    for name, devices in (("B GEMM into y", set()), ("base GEMM into u", {"cpu", "cuda"})):
        accumulate_updates.INTO_SHORTER_ON = devices
        try:
            found[f"unmerged, {name}"] = adaptc.compile(model, SPEC, "infer", adapters=weights,
                                                        merge=False)
        finally:
            accumulate_updates.INTO_SHORTER_ON = default
    run = accumulate_updates.AccumulateUpdates.run
    accumulate_updates.AccumulateUpdates.run = lambda self, gm, ctx: PassResult(gm, {})
    try:
        found |= both("without")
    finally:
        accumulate_updates.AccumulateUpdates.run = run
    return found


@torch.no_grad()
def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="8x256", metavar="BxS")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.hidden < 128 or args.hidden % 128:
        parser.error(f"--hidden must be a multiple of 128 (heads of 64, 2 KV heads), "
                     f"got {args.hidden}")
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=4, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=2, vocab_size=1000)
    model = LlamaForCausalLM(config).to(device, dtype).eval()
    batch, seq = map(int, args.tokens.split("x"))
    ids = torch.randint(0, 1000, (batch, seq), device=device)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with tempfile.TemporaryDirectory() as scratch:
        runs = {"base model": model, **variants(model, Path(scratch))}
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for key, fn in runs.items():
                times[key].append(seconds(lambda fn=fn: fn(**x), on_gpu, repeat=3,
                                          graph=on_gpu))  # device time on a GPU
    base = statistics.median(times["base model"])
    rows = [(key, statistics.median(t), statistics.median(t) / base) for key, t in times.items()]
    for key, t, ratio in rows:
        print(f"{key:28s} {t * 1e3:9.2f} ms  × base {ratio:5.3f}", flush=True)
    if args.write:
        name = torch.cuda.get_device_name() if on_gpu else platform.machine()
        lines = [f"\n## unmerged_updates.py — {datetime.date.today()}",
                 f"Device: {device} ({name}), {torch.get_num_threads()} threads, torch "
                 f"{torch.__version__}, {dtype}. Llama, 4 layers, hidden {args.hidden}, "
                 f"{args.tokens} tokens; all-linear LoRA r16; "
                 f"{'device time by CUDA-graph replay, ' if on_gpu else ''}median of "
                 f"{args.rounds} interleaved rounds.\n",
                 "| variant | ms | × base |", "|---|---|---|"]
        lines += [f"| {key} | {t * 1e3:.2f} | {ratio:.3f} |" for key, t, ratio in rows]
        with Path(__file__).with_name("RESULTS.md").open("a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
