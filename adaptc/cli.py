"""The `adaptc` command line: compile, inspect, check, import-peft, export-peft, generate,
passes.

User errors (spec, model, weights, output) print their message and exit 1 with no
traceback; argument errors exit 2; a reader that closes the pipe early (`| head`) ends the
command quietly with 141, as a shell tool killed by SIGPIPE.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.utils import logging as hf_logging

from adaptc import __version__
from adaptc.errors import AdaptcError, AdaptcWarning, ArtifactError, WeightsError, first_line
from adaptc.frontend.models import DEFAULT_MODEL, DTYPES, PRESETS


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # report.json's command line
    hf_logging.disable_progress_bar()  # transformers' shard bars would interleave our report
    try:
        with exit_on_sigterm(), warnings_on_one_line():
            return args.run(args)
    except AdaptcError as err:
        print(str(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return closed_stdout()


def closed_stdout() -> int:
    """The reader of stdout went away (`adaptc inspect ... | head`): point stdout at /dev/null
    so the interpreter's flush at exit does not fail again, and exit 128 + SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, a job scheduler's timeout) raises SystemExit(143) instead of ending
    the process at once, so the `finally` blocks that remove staged outputs run, as they do
    for Ctrl-C; otherwise a killed compile leaves its staging directory beside the output."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; a library caller keeps its own
        return
    def stop(signum, frame):
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def warnings_on_one_line() -> Iterator[None]:
    """adaptc's warnings (AdaptcWarning) print as one `warning: ...` line on stderr, instead
    of Python's `file:line: AdaptcWarning: ...` and the source line that raised it."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", AdaptcWarning)
        python_way = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, AdaptcWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                python_way(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        yield


SPEC_HELP = "a .adapt file, or - to read the spec from standard input"


def path(text: str) -> str:
    """A path or model argument: an empty one is an argument error, not the current directory
    (`--model ''`, `export-peft A ''`) nor the option left out (`--adapters ''` compiled the
    initial weights, `-o ''` wrote nothing)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def block_arg(text: str) -> int | str:
    """`--block`: an integer is a layer index, anything else a block's module path."""
    try:
        return int(text)
    except ValueError:
        return path(text)


def count(text: str) -> int:
    """A token count (--max-new-tokens): a negative one is an argument error naming the flag,
    not the library's message about `max_new_tokens`."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def cache_length(text: str) -> int:
    """--max-cache-len: below 2 (a prompt token and a new one) was refused by the decoder
    compiler after the model had loaded (and, with `compile -o`, after the infer graph and its
    check had been built), in the library's words (`max_cache_len`)."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a prompt token and a new one), "
                                         f"got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="adaptc", description="Compile .adapt specs into "
                                  "adapter graphs for parameter-efficient fine-tuning.")
    top.add_argument("--version", action="version", version=f"adaptc {__version__}")
    sub = top.add_subparsers(required=True, metavar="COMMAND")
    models = f"preset ({', '.join(PRESETS)}) or a checkpoint directory; default {DEFAULT_MODEL}"

    comp = sub.add_parser("compile", help="compile a spec onto a model")
    comp.add_argument("spec", type=path, help=SPEC_HELP)
    comp.add_argument("--model", type=path, default=DEFAULT_MODEL, help=models)
    comp.add_argument("--mode", default="train", choices=("train", "infer"))
    comp.add_argument("--adapters", type=path, metavar="FILE", help="infer mode: trained "
                      "adapter weights (.safetensors from adaptc.save_adapters); default: the "
                      "initial weights")
    comp.add_argument("-o", "--output", type=path, help="write an artifact directory (infer "
                      "mode: program.pt2, hf/ when everything merged, decoding/ with --decoder, "
                      "report.json)")
    add_infer_options(comp, "infer mode: ")
    comp.add_argument("--decoder", action="store_true",
                      help="infer mode with -o: also write cached-decoding programs "
                      "(decoding/) that `adaptc generate DIR` runs")
    comp.add_argument("--max-cache-len", type=cache_length,
                      help="with --decoder: the KV cache's length in tokens (default 128)")
    comp.add_argument("--force", action="store_true", help="replace an existing output")
    comp.add_argument("--dump-passes", type=path, metavar="DIR",
                      help="write the graph after each pass")
    add_placement(comp)
    comp.set_defaults(run=run_compile)

    insp = sub.add_parser("inspect", help="show matched sites, parameter counts and one block")
    insp.add_argument("spec", type=path, help=SPEC_HELP)
    insp.add_argument("--model", type=path, default=DEFAULT_MODEL, help=models)
    insp.add_argument("--block", type=block_arg, default=0,
                      help="layer index whose graph to show, in the first block stack "
                           "(negative: from its last layer), or a module path: a block's "
                           "(decoder.block.0 of an encoder-decoder) or an adapted module's "
                           "(model.embed_tokens under a prompt)")
    insp.set_defaults(run=run_inspect)

    check = sub.add_parser("check", help="parse and validate specs without a model")
    check.add_argument("specs", type=path, nargs="+", metavar="spec", help=SPEC_HELP,
                       action=StdinOnce)
    check.set_defaults(run=run_check)

    imp = sub.add_parser("import-peft", help="print the spec equivalent to a PEFT adapter "
                         "directory (adapter_config.json) for a model")
    imp.add_argument("directory", type=path)
    imp.add_argument("--model", type=path, default=DEFAULT_MODEL, help=models)
    imp.add_argument("-o", "--output", type=path, help="also write the spec to this .adapt file")
    imp.add_argument("--weights", type=path, metavar="FILE",
                     help="also write the adapter weights in adaptc's format (.safetensors), "
                          "for `compile --adapters FILE`")
    imp.add_argument("--force", action="store_true", help="replace existing output files")
    imp.set_defaults(run=run_import_peft)

    exp = sub.add_parser("export-peft", help="write an artifact's adapters as a PEFT adapter "
                         "directory")
    exp.add_argument("artifact", type=path, help="a directory written by `adaptc compile -o`")
    exp.add_argument("output", type=path)
    exp.add_argument("--task-type", help="PEFT task_type to record (e.g. CAUSAL_LM; prompts and "
                     "prefixes need it)")
    exp.add_argument("--force", action="store_true", help="replace an existing output")
    exp.set_defaults(run=run_export_peft)

    gen = sub.add_parser("generate", help="greedy decoding with a KV cache (infer mode; "
                         "without a cache for gated methods; encoder-decoders: the "
                         "decoder's reply to the source)")
    gen.add_argument("spec", type=path, help=f"{SPEC_HELP}; or an infer artifact directory written "
                     "with --decoder, whose programs run without compiling")
    gen.add_argument("--model", type=path, help=models)
    gen.add_argument("--adapters", type=path, metavar="FILE", help="trained adapter weights")
    given = gen.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="token ids, e.g. '5 17 42'")
    given.add_argument("--text", help="text, encoded with the checkpoint directory's tokenizer "
                       "(the output is decoded, and generation stops at the end ids of its "
                       "generation_config.json and its tokenizer unless --eos-token-id says "
                       "otherwise)")
    gen.add_argument("--max-new-tokens", type=count, default=16)
    gen.add_argument("--max-cache-len", type=cache_length, help="the KV cache's length in tokens "
                     "(default 128)")
    gen.add_argument("--eos-token-id", type=int, nargs="+", metavar="ID",
                     help="stop after generating any of these token ids")
    gen.add_argument("--torch-compile", action="store_true",
                     help="run the decoder graph through torch.compile (slow first tokens, "
                     "faster after)")
    gen.add_argument("--cuda-graph", action="store_true",
                     help="on a GPU, replay each one-token step from a CUDA graph captured "
                     "once (causal LMs)")
    add_infer_options(gen)
    add_placement(gen)
    gen.set_defaults(run=run_generate)

    passes = sub.add_parser("passes", help="print the pass pipeline in order")
    passes.add_argument("--mode", default="train", choices=("train", "infer"))
    passes.add_argument("--no-merge", dest="merge", action="store_false",
                        help="the infer pipeline without the merge passes")
    passes.add_argument("--fuse-projections", action="store_true",
                        help="the infer pipeline with fuse_projections")
    passes.set_defaults(run=run_passes)
    for command in sub.choices.values():  # `inspect --mode infer` was read as `--model infer`
        command.allow_abbrev = False
    return top


class StdinOnce(argparse.Action):
    """`check - -`: standard input can be read once; the second `-` read nothing and was
    reported as a spec with no statements."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values.count("-") > 1:
            parser.error(f"argument spec: '-' (standard input) is given {values.count('-')} "
                         "times; it can be read once")
        setattr(namespace, self.dest, values)


def add_infer_options(command: argparse.ArgumentParser, when: str = "") -> None:
    """--no-merge and --fuse-projections, for the commands that build an infer graph."""
    command.add_argument("--no-merge", dest="merge", action="store_false",
                         help=f"{when}keep weight-space updates beside the base weights "
                         "(LoRA as linear ops, sibling A matrices in one GEMM)")
    command.add_argument("--fuse-projections", action="store_true",
                         help=f"{when}one GEMM for linear layers that read the same input "
                         "(q, k, v; gate, up)")


def add_placement(command: argparse.ArgumentParser) -> None:
    command.add_argument("--dtype", choices=tuple(DTYPES),
                         help="cast the model's weights (default: as stored; presets float32)")
    command.add_argument("--device", help="where the model runs and the graph is traced, e.g. "
                         "cuda (default cpu); an exported program runs there")


def placed_model(args):
    from adaptc.frontend.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def run_compile(args) -> int:
    from adaptc.adapters import check_adapter_file
    from adaptc.artifact import refuse_existing, refuse_inputs
    from adaptc.frontend.models import PRESETS
    from adaptc.compiler import compile, prepare, report_of

    if args.adapters and args.mode != "infer":
        raise AdaptcError("--adapters is for --mode infer (train mode starts from the initial "
                          "weights; load saved ones with adaptc.load_adapters)")
    refuse_infer_options(args)
    if args.decoder and not (args.mode == "infer" and args.output):
        raise AdaptcError("--decoder writes decoding programs into an infer artifact: it "
                          "needs --mode infer and -o DIR")
    if args.max_cache_len is not None and not args.decoder:
        raise AdaptcError("--max-cache-len sizes the cache of --decoder's programs; it needs "
                          "--decoder")
    if args.output:
        refuse_existing(Path(args.output), args.force)  # before the work, not only after it
        refuse_inputs(Path(args.output), [("model checkpoint", None if args.model in PRESETS
                                           else args.model),
                                          ("adapter file", args.adapters),
                                          ("spec file", args.spec)])
        refuse_dump_inside(Path(args.output), args.dump_passes or os.environ.get("ADAPTC_DUMP"))
    if args.adapters:  # was found missing after the model and the train graph
        check_adapter_file(args.adapters)
    start = time.perf_counter()
    plan = spec_plan(args.spec)  # a spec error before the model loads
    ctx = prepare(placed_model(args), plan, args.mode)
    if args.output and ctx.model.on_meta:  # before the work, not only after it
        raise ArtifactError(f"{args.output}: model '{args.model}' is on the meta device (shapes "
                          "only); an artifact needs real weights")
    if args.decoder:  # refused after the infer graph and its check had been built
        refuse_undecodable(ctx)
    with tempfile.TemporaryDirectory() as scratch:
        reference, adapters = None, args.adapters
        if args.mode == "infer" and args.output:
            reference, adapters = train_reference(ctx, args.adapters, Path(scratch))
        gm = compile(ctx.model, ctx.plan, args.mode, adapters=adapters, merge=args.merge,
                     fuse_projections=args.fuse_projections, dump_dir=args.dump_passes)
        decoder = cached_decoder(ctx.model, ctx.plan, adapters, args) if args.decoder else None
    report = report_of(gm)
    print(f"compiled {plan.spec.path} onto {args.model} ({type(ctx.model.module).__name__}) "
          f"in {args.mode} mode in {time.perf_counter() - start:.1f} s")
    print("passes: " + " → ".join(report.pipeline))
    print("  " + ", ".join(f"{k}={v}" for k, v in report.counts.items() if v))
    if args.mode == "infer":
        print(fusion_line(report.counts))
    print(report.peft_line())
    if args.output and args.mode == "train":
        write_train(args, ctx, gm)
    elif args.output:
        write_infer(args, ctx, gm, reference, decoder)
    return 0


def refuse_infer_options(args) -> None:
    if args.mode != "infer" and (not args.merge or args.fuse_projections):
        raise AdaptcError("--no-merge and --fuse-projections are for --mode infer (train "
                          "mode keeps the layers as traced)")


def refuse_dump_inside(out: Path, dump: str | None) -> None:
    """--dump-passes (or ADAPTC_DUMP) into the -o directory filled it during the work, so -o
    then refused the non-empty output (or, with --force, replaced the dump)."""
    target = out.resolve()
    if dump and (Path(dump).resolve() == target or target in Path(dump).resolve().parents):
        raise ArtifactError(f"{out}: the graph dump ({dump}, --dump-passes or ADAPTC_DUMP) "
                            "writes into the output directory, "
                            "which -o replaces when the compile is done; dump elsewhere")


def cached_decoder(model, plan, adapters: str | None, args):
    """The cached decoder of the model's kind (adaptc.decode, adaptc.decode_seq2seq)."""
    from adaptc.decode import MAX_CACHE_LEN, compile_decoder
    from adaptc.decode_seq2seq import compile_seq2seq_decoder
    from adaptc.frontend.trace import is_encoder_decoder

    cache = MAX_CACHE_LEN if args.max_cache_len is None else args.max_cache_len
    options = dict(adapters=adapters, max_cache_len=cache, merge=args.merge,
                   fuse_projections=args.fuse_projections,
                   torch_compile=getattr(args, "torch_compile", False))
    if is_encoder_decoder(model):
        refuse_cuda_graph(args)
        return compile_seq2seq_decoder(model, plan, **options)
    return compile_decoder(model, plan, cuda_graph=getattr(args, "cuda_graph", False),
                           **options)


def refuse_undecodable(ctx) -> None:
    """--decoder on a model with no next token to pick (BERT's encoder, a classifier), or on
    a causal LM under a gated spec (an encoder-decoder's decoder sites are known once traced)."""
    from adaptc.decode import check_causal_lm, refuse_gated
    from adaptc.frontend.trace import is_encoder_decoder

    if not is_encoder_decoder(ctx.model):
        check_causal_lm(ctx.model)
        refuse_gated(ctx.assignments)


def refuse_cuda_graph(args, why: str = "this model is an encoder-decoder") -> None:
    if getattr(args, "cuda_graph", False):
        raise AdaptcError(f"--cuda-graph is for causal LMs' cached decoding; {why}")


def train_reference(ctx, adapters: str | None, scratch: Path):
    """The train-mode graph an infer artifact is verified against, and the weights file both
    use: the given one, or the train graph's initial weights (random for some methods, such
    as prompt tuning, so the two graphs must share them)."""
    from adaptc.adapters import load_adapters, save_adapters
    from adaptc.compiler import compile

    reference = compile(ctx.model, ctx.plan, "train")
    if adapters:
        load_adapters(reference, adapters)
        return reference, adapters
    return reference, save_adapters(reference, scratch / "initial.safetensors")


def fusion_line(counts: dict[str, int]) -> str:
    """What the infer passes did: folded into base weights, fused into ops, lowered or
    concatenated (when they did), kept eager."""
    def listed(suffix: str) -> str:
        found = [f"{v} {k.removesuffix(suffix)}" for k, v in counts.items()
                 if k.endswith(suffix) and v]
        return ", ".join(found) or "none"
    parts = [f"merged into base weights: {listed('_merged')}", f"fused ops: {listed('_fused')}"]
    if counts.get("lora_lowered"):
        parts.append(f"unmerged LoRA as linear ops: {counts['lora_lowered']} "
                     f"({counts['lora_sibling_groups']} sibling groups with one A GEMM)")
    if counts.get("projection_groups"):
        parts.append(f"concatenated projections: {counts['projections_concatenated']} linear "
                     f"layers in {counts['projection_groups']} GEMMs")
    return "; ".join([*parts, f"kept eager: {counts.get('kept_eager', 0)}",
                      f"prompts folded: {counts.get('prompts_folded', 0)}"])


def write_train(args, ctx, gm) -> None:
    from adaptc.artifact import write_artifact

    out = write_artifact(gm, ctx.model, args.output, force=args.force)
    print(f"wrote {out}/ (spec.adapt, model/, adapters.safetensors, manifest.json); "
          f"load it with adaptc.load({str(out)!r})")


def write_infer(args, ctx, gm, reference, decoder) -> None:
    """program.pt2, hf/, decoding/ and report.json, verified against the train-mode graph
    (decoding/: against the compiled decoder)."""
    from adaptc.export import HF_DIR, REPORT_FILE, write_infer_artifact
    from adaptc.passes.load_adapters import ADAPTERS_FILE

    if not args.adapters:  # the initial weights went through a scratch file, no input of
        gm.meta.pop(ADAPTERS_FILE, None)  # the user's: report.json records none
    out = write_infer_artifact(gm, ctx.model, args.output, reference=reference, force=args.force,
                               decoder=decoder, command=["adaptc", *args.argv])
    report = json.loads((out / REPORT_FILE).read_text())
    check = report["verification"]
    hf = f"{HF_DIR}/, " if report["hf"] else ""
    saved = "decoding/, " if decoder else ""
    print(f"wrote {out}/ (program.pt2, {hf}{saved}report.json); against the train-mode graph: "
          f"max abs error {check['max_abs_error']:.3g}, max rel error {check['max_rel_error']:.3g}")
    if report.get("hf_skipped"):
        print(f"no {HF_DIR}/ checkpoint: {report['hf_skipped']}")
    if decoder:
        check = report["decoding"]["check"]
        same = "the same" if check["same_tokens"] else "OTHER"
        print(f"decoding/: {same} greedy tokens as the compiled decoder, max abs logit error "
              f"{check['max_abs_logit_error']:.3g}; run it with `adaptc generate {out}`")


def spec_plan(spec: str):
    """The validated spec of a command: a .adapt file, or standard input for '-'."""
    from adaptc.spec import decode_spec, load_spec, lower

    if spec == "-":  # bytes, decoded as files are (text mode let a bad byte through)
        return lower(decode_spec(sys.stdin.buffer.read(), "<stdin>"))
    return lower(load_spec(spec))


def run_inspect(args) -> int:
    from adaptc.inspection import inspect

    print(inspect(args.model, spec_plan(args.spec), block=args.block))
    return 0


def run_check(args) -> int:
    """Each spec's `ok` line, or its diagnostics on stderr; exit 1 when any failed, after all
    were checked (a pre-commit hook or CI step passes every .adapt file at once)."""
    failed = False
    for spec in args.specs:
        try:
            plan = spec_plan(spec)
        except AdaptcError as err:
            print(str(err), file=sys.stderr)
            failed = True
            continue
        mixture = " + mixture" if plan.mixture else ""
        count = len(plan.rules)
        print(f"{plan.spec.path}: ok ({count} attach statement{'s' * (count != 1)}{mixture})")
    return 1 if failed else 0


def run_generate(args) -> int:
    from adaptc.adapters import check_adapter_file
    from adaptc.decoding_program import DECODING_DIR, load_decoding

    saved = Path(args.spec).is_dir()
    if saved:
        refuse_compile_options(args)
    args.model = args.model or DEFAULT_MODEL
    # a spec error before the model loads, and before --text looks for the model's tokenizer
    # (a mistyped spec path was reported as the default model's missing tokenizer)
    plan = None if saved else spec_plan(args.spec)
    tokenizer, eos = None, args.eos_token_id
    if args.text is not None:
        folder = str(Path(args.spec) / DECODING_DIR) if saved else args.model
        tokenizer = checkpoint_tokenizer(folder)
        prompt = tokenizer(args.text)["input_ids"]
        eos = checkpoint_end_ids(folder, tokenizer) if eos is None else eos
    else:
        try:
            prompt = [int(token) for token in args.prompt.replace(",", " ").split()]
        except ValueError:
            raise AdaptcError(f"--prompt takes token ids separated by spaces, got "
                              f"{args.prompt!r}") from None
    if saved:
        tokens = load_decoding(args.spec, args.torch_compile, args.cuda_graph).generate(
            prompt, args.max_new_tokens, eos)
    else:
        if args.adapters:
            check_adapter_file(args.adapters)
        gated = any(getattr(r.config, "gate", False) for r in plan.rules)
        if gated:  # was refused as if the model were an encoder-decoder
            refuse_cuda_graph(args, "a gated spec decodes without a KV cache (the whole "
                              "sequence at each step), so there is no one-token step to replay")
        model = placed_model(args)
        if gated:
            tokens = generate_uncached(model, plan, prompt, args, eos)
        else:
            decoder = cached_decoder(model, plan, args.adapters, args)
            tokens = decoder.generate(prompt, args.max_new_tokens, eos)
    print(tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer
          else " ".join(map(str, tokens)))
    return 0


def refuse_compile_options(args) -> None:
    """A saved decoder is compiled already: options that would change it are errors."""
    given = [flag for flag, value in (("--model", args.model), ("--adapters", args.adapters),
                                      ("--max-cache-len", args.max_cache_len is not None),
                                      ("--no-merge", not args.merge),
                                      ("--fuse-projections", args.fuse_projections),
                                      ("--dtype", args.dtype), ("--device", args.device))
             if value]
    if given:
        raise AdaptcError(f"{args.spec} is a compiled artifact: {', '.join(given)} would "
                          "change how it was compiled (recompile it with `adaptc compile "
                          "--mode infer --decoder`)")


def generate_uncached(model, plan, prompt: list[int], args, eos: int | None) -> list[int]:
    """Greedy decoding under a gated (UniPELT) method, which the cached decoders refuse: the
    infer graph run on the whole sequence at each step (no KV cache). A causal LM's prompt and
    new tokens; an encoder-decoder's reply to the source `prompt` (its new tokens)."""
    import torch

    from adaptc.compiler import compile
    from adaptc.decode import check_causal_lm, check_token_ids, stop_ids
    from adaptc.frontend.trace import is_encoder_decoder
    from adaptc.generation import greedy_generate

    if args.max_cache_len is not None:  # it was ignored: the reply looked length-limited
        raise AdaptcError("--max-cache-len sizes a KV cache; a gated spec decodes without one "
                          "(the whole sequence at each step)")
    seq2seq = is_encoder_decoder(model)
    if not seq2seq:
        check_causal_lm(model)
    config = model.module.config
    check_token_ids(prompt, config.vocab_size)
    stop_ids(eos, config.vocab_size)
    gm = compile(model, plan, "infer", adapters=args.adapters, merge=args.merge,
                 fuse_projections=args.fuse_projections)
    run = torch.compile(gm) if args.torch_compile else gm
    device = next(gm.parameters()).device
    ids = torch.tensor([prompt], device=device)
    try:
        out = greedy_generate(run, ids, torch.ones_like(ids), args.max_new_tokens, eos,
                              config.decoder_start_token_id if seq2seq else None)
    except ValueError as err:  # the module's length bound: was a traceback from the command
        raise AdaptcError(str(err)) from None
    if not seq2seq:
        return out[0].tolist()
    tokens = out[0, 1:].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def checkpoint_tokenizer(model: str):
    """The tokenizer saved in checkpoint directory `model` (presets have none)."""
    from transformers import AutoTokenizer

    from adaptc.artifact import TOKENIZER_FILES

    if not Path(model).is_dir():
        raise AdaptcError(f"--text needs a checkpoint directory with a tokenizer; '{model}' is "
                          "a preset without one (pass token ids with --prompt)")
    if not any((Path(model) / name).is_file() for name in TOKENIZER_FILES):
        raise AdaptcError(f"{model}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, …) "
                          "to encode --text with; pass token ids with --prompt")
    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True,
                                             trust_remote_code=False)  # no y/N prompt
    except Exception as err:  # transformers and tokenizers raise many types for a damaged
        # file (OSError, ValueError, KeyError 'added_tokens' for a tokenizer.json of {})
        raise AdaptcError(f"{model}: no tokenizer to encode --text with "
                          f"({type(err).__name__}: {first_line(err)}); pass token ids with "
                          "--prompt") from None


def checkpoint_end_ids(folder: str, tokenizer) -> list[int] | None:
    """The ids `--text` generation stops after: the `eos_token_id` of the checkpoint's
    generation_config.json, which transformers' `generate` stops at (an id or a list: a chat
    model's end of turn beside its end of text, Llama 3's [128001, 128009]), and the
    tokenizer's end-of-sequence token; None when there are neither."""
    from adaptc.decode import end_ids
    from adaptc.decoding_program import GENERATION_CONFIG

    ids, path = [], Path(folder) / GENERATION_CONFIG
    if path.is_file():
        try:
            ids = end_ids(json.loads(path.read_text()).get("eos_token_id"))
        except (ValueError, TypeError, AttributeError) as err:
            raise AdaptcError(f"{path}: eos_token_id is not a token id or a list of them "
                              f"({first_line(err)})") from None
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids or None


def run_import_peft(args) -> int:
    from adaptc.artifact import refuse_inputs, write_file
    from adaptc.compiler import report_of
    from adaptc.frontend.models import PRESETS
    from adaptc.peft_interop import CONFIG, PICKLED, WEIGHTS, import_peft, spec_from_peft

    outputs = [Path(f) for f in (args.output, args.weights) if f]
    if len(outputs) == 2 and outputs[0].resolve() == outputs[1].resolve():
        raise ArtifactError(f"{args.output}: -o and --weights name the same file (the weights "
                            "would replace the spec)")
    peft = Path(args.directory)
    inputs = [("PEFT adapter file", peft / CONFIG), ("PEFT adapter file", peft / WEIGHTS),
              ("PEFT adapter file", peft / PICKLED),
              ("PEFT adapter directory", peft),
              ("model checkpoint", None if args.model in PRESETS else args.model)]
    for path in outputs:  # before the work, not only after it
        if path.is_dir():  # with --force: refused after the import, the spec already printed
            raise ArtifactError(f"{path}: is a directory; -o and --weights write files")
        if path.exists() and not args.force:
            raise ArtifactError(f"{path}: file exists (use --force)")
        refuse_inputs(path, inputs)
    if args.weights:
        imported = import_peft(args.model, args.directory)
        spec = report_of(imported).spec_source
    else:
        spec = spec_from_peft(args.directory, args.model)
    print(spec, end="")
    if args.weights:
        write_imported(imported, spec, args)
        print(f"wrote {args.weights} (adapter weights for this spec)", file=sys.stderr)
    elif args.output:
        write_file(Path(args.output), spec, args.force)
    return 0


def write_imported(imported, spec: str, args) -> None:
    """--weights, and -o when given: both or neither. The weights are staged beside their path
    and renamed into place after the spec is written (a full disk while writing the weights
    left the spec written alone)."""
    from adaptc.adapters import save_adapters
    from adaptc.artifact import write_file

    weights = Path(args.weights)
    place = Path(os.path.realpath(weights))  # a symlink's file, as write_file's
    staged = place.with_name(f".{place.name}.import-{os.getpid()}")
    try:
        save_adapters(imported, staged)
        if args.output:
            write_file(Path(args.output), spec, args.force)
        staged.replace(place)
    except WeightsError as err:
        if err.__cause__ is None:
            raise
        cause = err.__cause__  # the write error; the message named the staged file
        raise WeightsError(f"{weights}: cannot write adapter weights: "
                           f"{getattr(cause, 'strerror', None) or cause}") from cause
    except OSError as err:
        raise WeightsError(f"{weights}: cannot write adapter weights: "
                           f"{err.strerror or err}") from err
    finally:
        staged.unlink(missing_ok=True)


def run_export_peft(args) -> int:
    from adaptc.artifact import load, refuse_existing, refuse_inputs
    from adaptc.peft_interop import check_task_type, export_peft

    refuse_existing(Path(args.output), args.force)  # before the work, not only after it
    check_task_type(args.task_type)  # was checked after the artifact had been recompiled
    refuse_inputs(Path(args.output), [("artifact", args.artifact)])
    out = export_peft(load(args.artifact), args.output, task_type=args.task_type,
                      force=args.force)
    print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors)")
    return 0


def run_passes(args) -> int:
    from adaptc.passes import PassManager, default_pipeline

    refuse_infer_options(args)  # the train pipeline was printed as if they applied
    print(PassManager(default_pipeline(args.mode, args.merge, args.fuse_projections)).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
