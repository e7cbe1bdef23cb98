"""Memory of the frozen base weights with `quantize` (NF4 + double quantisation) against the
same weights in float32 and bfloat16, for the QLoRA spec on Llama shapes, the tensors of
its inference module merged (a dense copy) and unmerged (`merge=False`: the NF4 base stays),
plus what a training step holds for backward (LoRA against QLoRA, bfloat16, 1×512 tokens)
and the output drift it causes on the tiny seeded preset.

    python benchmarks/qlora_memory.py [--write]

Full-size presets live on `meta`: the byte counts come from the real buffer shapes adaptc
allocates (packed codes, int8 block constants, second-level scales), no values needed.
`--write` appends a dated section to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

SPEC = "*_proj: quantize\n*_proj: lora r=8 alpha=16"
MODELS = ["llama-7b", "llama-13b", "llama-70b"]


def row(preset: str) -> dict:
    import adaptc
    from adaptc.frontend.models import build_preset

    counts = adaptc.report_of(adaptc.compile(build_preset(preset), SPEC)).counts
    numel = counts["weight_bytes_before"] // 4  # presets are float32
    return {"model": preset, "weights": numel, "fp32": 4 * numel, "bf16": 2 * numel,
            "nf4": counts["weight_bytes_after"],
            "bits": 8 * counts["weight_bytes_after"] / numel}


def infer_row(preset: str) -> dict:
    """GiB of every tensor of the infer module on the bfloat16 model, merged and unmerged."""
    import adaptc
    from adaptc.frontend.models import build_preset

    model = build_preset(preset)
    model.module.to(torch.bfloat16)
    sizes = {}
    for merge in (True, False):
        gm = adaptc.compile(model, SPEC, "infer", merge=merge)
        sizes[merge] = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()])
    return {"model": preset, "merged": sizes[True], "unmerged": sizes[False]}


def train_row(preset: str, tokens: int = 512) -> dict:
    """Bytes of the train module's tensors and of the new tensors autograd saves for backward
    in one forward pass over 1×`tokens` (the module's own parameters and buffers, which
    autograd saves too, are counted once, as stored), LoRA and QLoRA on the bfloat16 model."""
    import adaptc
    from adaptc.frontend.models import build_preset

    model = build_preset(preset)
    model.module.to(torch.bfloat16)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    sizes = {}
    for name, spec in (("lora", SPEC.split("\n")[1]), ("qlora", SPEC)):
        gm = adaptc.compile(model, spec)
        own = [*gm.parameters(), *gm.buffers()]
        known, saved = {id(t) for t in own}, {}

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if id(base) not in known:
                saved[id(base)] = base.numel() * base.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            gm(input_ids=ids, attention_mask=torch.ones_like(ids))
        sizes[name] = (sum(t.numel() * t.element_size() for t in own), sum(saved.values()))
    return {"model": preset, "tokens": tokens, **sizes}


def train_table(rows: list[dict]) -> str:
    gib = 1024 ** 3
    lines = ["| model | tokens | LoRA: module GiB | saved for backward GiB | QLoRA: module GiB "
             "| saved for backward GiB | QLoRA / LoRA, module + saved |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        total = {k: sum(r[k]) for k in ("lora", "qlora")}
        lines.append(f"| {r['model']} | 1×{r['tokens']} | {r['lora'][0] / gib:.2f} | "
                     f"{r['lora'][1] / gib:.2f} | {r['qlora'][0] / gib:.2f} | "
                     f"{r['qlora'][1] / gib:.2f} | {total['qlora'] / total['lora']:.2f} |")
    return "\n".join(lines)


def infer_table(rows: list[dict]) -> str:
    gib = 1024 ** 3
    lines = ["| model | infer module, merged GiB | infer module, `merge=False` GiB | ratio |",
             "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['merged'] / gib:.2f} | {r['unmerged'] / gib:.2f} | "
              f"{r['unmerged'] / r['merged']:.2f} |" for r in rows]
    return "\n".join(lines)


def drift() -> float:
    """Relative change of the tiny Llama's logits when its projections are stored as NF4
    (LoRA at init adds nothing)."""
    import adaptc
    from adaptc.frontend.models import build_preset

    model = build_preset("llama")
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    base = model.module(**x).logits
    ours = adaptc.compile(model, SPEC)(**x).logits
    return ((ours - base).norm() / base.norm()).item()


def table(rows: list[dict]) -> str:
    gib = 1024 ** 3
    lines = ["| model | projection weights | float32 GiB | bfloat16 GiB | NF4+DQ GiB | bits/weight "
             "| saved vs bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights'] / 1e9:.2f} B | {r['fp32'] / gib:.2f} | "
                     f"{r['bf16'] / gib:.2f} | {r['nf4'] / gib:.2f} | {r['bits']:.3f} | "
                     f"{1 - r['nf4'] / r['bf16']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    text = (table([row(m) for m in MODELS]) + "\n\nInference module (every parameter and "
            "buffer, bfloat16 model, LoRA weights included):\n\n" +
            infer_table([infer_row(m) for m in MODELS]) +
            "\n\nTraining step (train module's tensors, and the new tensors autograd saves for "
            "backward in one forward pass; optimizer state not included):\n\n" +
            train_table([train_row(m) for m in MODELS]) +
            f"\n\nTiny seeded Llama (4 layers, hidden 128): NF4 storage of every projection "
            f"changes the logits by {drift():.1%} (relative L2) before any training.")
    print(text)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        head = (f"\n## qlora_memory.py — {datetime.date.today()}\nSpec `{SPEC!r}` "
                f"(torch {torch.__version__}); bytes of the frozen projection weights only "
                "(embeddings, norms and the LM head are not quantised).\n\n")
        path.write_text(path.read_text() + head + text + "\n")


if __name__ == "__main__":
    main()
