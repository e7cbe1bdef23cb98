"""Decode tokens/s of encoder-decoder generation, interleaved in one run: adaptc's cached
decoder (adaptc.decode_seq2seq) next to full-sequence decoding (`greedy_generate` on the
infer graph, what `adaptc generate` ran before), transformers' own `generate` of the base
model, and PEFT's `generate` with the same LoRA.

    python benchmarks/decode_seq2seq.py [--model flan-t5-base] [--source 32] [--tokens 32]
                                        [--rounds 3] [--write]

`--model` takes an encoder-decoder preset (t5, flan-t5-base, ...), built with random weights.

Ratios are time per token over the base row's (adaptc's cached decoder with a merged zero
LoRA: the base model's operations through the same exported graphs). Greedy, batch 1; no
end-of-sequence stop, so every variant produces `--tokens` tokens.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

QV = "attn.q,attn.v: lora r=8"
PEFT_TARGETS = ["q", "v"]


def variants(model, new_tokens: int) -> dict:
    """name → callable(source ids) producing `new_tokens` tokens."""
    import adaptc
    from adaptc.decode_seq2seq import compile_seq2seq_decoder

    start = model.module.config.decoder_start_token_id
    scratch = Path(tempfile.mkdtemp())
    built = {}
    for name, spec, random, options in (
            ("adaptc cached, base (merged zero LoRA)", QV, False, {}),
            ("adaptc cached, LoRA q,v r8 merged", QV, True, {}),
            ("adaptc cached, LoRA q,v r8 unmerged", QV, True, {"merge": False}),
            ("adaptc cached, bottleneck 64 on attn, ffn", "attn,ffn: adapter bottleneck=64",
             True, {})):
        path = adapters(model, spec, random, scratch / f"{len(built)}.safetensors")
        decoder = compile_seq2seq_decoder(model, spec, adapters=path,
                                          max_cache_len=new_tokens + 1, **options)
        built[name] = lambda ids, d=decoder: d.generate(ids, new_tokens)
    path = adapters(model, QV, True, scratch / "full.safetensors")
    infer = adaptc.compile(model, QV, "infer", adapters=path)
    built["adaptc full-sequence (greedy_generate), LoRA merged"] = lambda ids: (
        adaptc.greedy_generate(infer, torch.tensor([ids]), torch.ones(1, len(ids), dtype=int),
                               new_tokens, decoder_start_token_id=start))
    built["transformers generate, base model"] = hf_generate(model.module, new_tokens)
    built["PEFT generate, LoRA q,v r8 (unmerged)"] = hf_generate(peft_lora(model.module),
                                                                 new_tokens)
    return built


def adapters(model, spec: str, random: bool, path: Path) -> Path:
    import adaptc

    gm = adaptc.compile(model, spec)
    if random:
        with torch.no_grad():
            for p in adaptc.adapter_state_dict(gm).values():
                p.normal_(0, 0.02)
    return adaptc.save_adapters(gm, path)


def peft_lora(module):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=8, lora_alpha=8,
                        target_modules=PEFT_TARGETS)
    peft = get_peft_model(copy.deepcopy(module), config).eval()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft


def hf_generate(module, new_tokens: int):
    def run(ids):
        with torch.no_grad():
            return module.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, num_beams=1)
    return run


def random_init(preset: str):
    """The preset's architecture with seeded random weights on the CPU (the full-size presets
    are built on `meta`)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from adaptc.frontend.models import PRESETS, wrap

    model_type, overrides, _ = PRESETS[preset]
    torch.manual_seed(0)
    module = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **overrides))
    return wrap(module.eval(), source=preset)


def seconds_per_token(run, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    run(ids)
    return (time.perf_counter() - start) / new_tokens


def main() -> None:
    import adaptc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flan-t5-base")
    parser.add_argument("--source", type=int, default=32, help="source tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    model = random_init(args.model)
    ids = [3 + i % 50 for i in range(args.source)]
    built = variants(model, args.tokens)
    for run in built.values():
        run(ids[:4])  # warm-up
    times = {name: [] for name in built}
    for _ in range(args.rounds):  # interleaved: every variant once per round
        for name, run in built.items():
            times[name].append(seconds_per_token(run, ids, args.tokens))
    base = statistics.median(times[next(iter(times))])
    rows = [(name, 1 / statistics.median(t), statistics.median(t) / base)
            for name, t in times.items()]
    for name, rate, ratio in rows:
        print(f"{name:54s} {rate:8.1f} tok/s  time × base {ratio:5.2f}")
    if args.write:
        write(rows, args)


def write(rows, args) -> None:
    import peft
    import transformers

    lines = [f"\n## decode_seq2seq.py — {datetime.date.today()}",
             f"Device: CPU ({platform.machine()}, {torch.get_num_threads()} threads). torch "
             f"{torch.__version__}, transformers {transformers.__version__}, peft "
             f"{peft.__version__}, float32. Model `{args.model}` (random init), batch 1, "
             f"{args.source}-token source, {args.tokens} new tokens, greedy, no eos stop; "
             f"median of {args.rounds} interleaved rounds.\n",
             "| variant | tokens/s | time × base |", "|---|---|---|"]
    lines += [f"| {n} | {r:.1f} | {x:.2f} |" for n, r, x in rows]
    with Path(__file__).with_name("RESULTS.md").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
