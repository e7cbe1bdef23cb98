"""Wall time of `adaptc.compile` on full-size shapes (meta device) next to PEFT's
`get_peft_model` and a `torch.export` of the whole model (what adaptc avoids for decoders by
tracing one block and replicating it; an encoder-decoder is exported whole), measured side by
side in one run.

    python benchmarks/compile_time.py [--repeat 3] [--models llama-7b flan-t5-xl] [--write]

`--write` appends a dated section to benchmarks/RESULTS.md. Model building is excluded
from every timing (each provider gets a freshly built meta model).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

SPEC = "attn.q,attn.v: lora r=8 alpha=16"
MODELS = ["llama-7b", "llama-70b", "flan-t5-xl"]
PEFT_TARGETS = {"llama": ["q_proj", "v_proj"], "t5": ["q", "v"]}  # what SPEC stands for


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls of fn(model) on fresh models."""
    from adaptc.frontend.models import build_preset

    times = []
    for _ in range(repeat):
        model = build_preset(fn.preset)
        start = time.perf_counter()
        fn(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def providers(preset: str) -> dict:
    import adaptc
    from adaptc.frontend.trace import trace
    from peft import LoraConfig, get_peft_model

    def ours(model):
        adaptc.compile(model, SPEC)

    def peft(model):
        targets = PEFT_TARGETS[model.family]
        get_peft_model(model.module, LoraConfig(r=8, lora_alpha=16, target_modules=targets))

    def export_only(model):
        trace(model, reuse_blocks=False)

    for fn in (ours, peft, export_only):
        fn.preset = preset
    return {"adaptc.compile": ours, "peft.get_peft_model": peft, "torch.export, whole model": export_only}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = []
    for preset in args.models:
        for name, fn in providers(preset).items():
            seconds = timed(fn, args.repeat)
            rows.append((preset, name, seconds))
            print(f"{preset:10s} {name:22s} {seconds:8.2f} s", flush=True)
    if args.write:
        write(rows, args.repeat)


def write(rows, repeat: int) -> None:
    import peft
    import transformers

    base = {preset: s for preset, name, s in rows if name == "peft.get_peft_model"}
    lines = [f"\n## compile_time.py — {datetime.date.today()}",
             f"Device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             f"threads), meta-device models. torch {torch.__version__}, transformers "
             f"{transformers.__version__}, peft {peft.__version__}. Spec `{SPEC}`; median of "
             f"{repeat} runs each.\n",
             "| model | provider | seconds | × PEFT |", "|---|---|---|---|"]
    lines += [f"| {p} | {n} | {s:.2f} | {s / base[p]:.1f} |" for p, n, s in rows]
    path = Path(__file__).with_name("RESULTS.md")
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with path.open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
