"""Infer-mode artifacts: what `adaptc compile --mode infer -o DIR` writes.

    DIR/program.pt2   the infer GraphModule through torch.export, batch and sequence dynamic
                      as when tracing; `load_program(DIR / "program.pt2")` loads it
    DIR/hf/           when every adapter merged into the base weights (or is a `train`ed
                      parameter) and the model is a Hugging Face model: a standard
                      checkpoint (config.json + model.safetensors, and the input's
                      tokenizer files) that transformers loads without adaptc
    DIR/decoding/     with a cached decoder (`--decoder`): its programs, for `adaptc generate
                      DIR` (decoding_program.py)
    DIR/report.json   spec, model, pass counts, versions, how it was compiled (`compile`:
                      the command line, merge, fuse_projections, dtype, device, the adapter
                      file and its sha256), and the verification: max absolute and relative
                      error of the saved program against the train-mode graph on random
                      inputs (relative: max |program − train| / max |train|); with
                      decoding/, its description and check

The directory is staged beside its destination and renamed into place (artifact.py's
helpers); an existing non-empty output is refused unless `force`.
"""
from __future__ import annotations

import copy
import io
import json
import signal
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from adaptc.artifact import (
    PROGRAM,
    atomic_directory,
    copy_tokenizer,
    model_inputs,
    refuse_existing,
    refuse_inputs,
    versions,
)
from adaptc.compiler import REPORT, as_model
from adaptc.errors import ArtifactError, first_line, held_log_records
from adaptc.frontend.models import LoadedModel
from adaptc.frontend.trace import dynamic_shapes, export_dynamic
from adaptc.passes.base import INSERTED, MERGED
from adaptc.passes.fuse_projections import FuseProjections, graph_tensor
from adaptc.passes.load_adapters import ADAPTERS_FILE
from adaptc.passes.merge_weights import MergeWeights

FORMAT = 1
HF_DIR, REPORT_FILE = "hf", "report.json"


def write_infer_artifact(gm: GraphModule, model, out: str | Path, *, reference: GraphModule,
                         force: bool = False, decoder=None,
                         command: list[str] | None = None) -> Path:
    """Export the infer-mode `gm` compiled from `model` into `out`, atomically.

    `reference` is the train-mode graph of the same spec and adapter weights; the report
    compares the saved program with it. `decoder`, a cached decoder compiled from the same
    spec and weights (compile_decoder, compile_seq2seq_decoder), goes into decoding/.
    `command`, the command line that compiled it (the CLI's), goes into the report beside
    the options read from `gm` and `model` (compile_options).
    """
    out = Path(out)
    refuse_existing(out, force)
    model = as_model(model, None)
    refuse_inputs(out, model_inputs(model))
    if gm.meta[REPORT].mode != "infer":
        raise ArtifactError(f"{out}: an infer artifact needs a module compiled with mode='infer'")
    if model.on_meta:
        raise ArtifactError(f"{out}: model '{model.source}' is on the meta device (shapes only); "
                            "exporting needs real weights")
    program = export_program(gm, model)
    why_no_hf = hf_blocker(gm, model)
    with atomic_directory(out) as staging:
        save_program(program, staging / PROGRAM)
        if why_no_hf is None:
            write_hf(gm, model, staging / HF_DIR)
        check = verify(load_program(staging / PROGRAM).module(), reference, model, out)
        report = describe(gm, model, why_no_hf, check)
        report["compile"] = {**({"command": command} if command else {}),
                             **compile_options(gm, model)}
        if decoder is not None:
            from adaptc.decoding_program import DECODING_DIR, save_decoding  # imports this
            report["decoding"] = save_decoding(decoder, staging / DECODING_DIR, model.source)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def export_program(gm: GraphModule, model: LoadedModel) -> torch.export.ExportedProgram:
    """torch.export of the infer graph with the dynamic batch/sequence dims used for tracing
    (as `Dim.AUTO` where torch cannot prove the graph's guards over the named ranges: see
    `export_dynamic`; report.json's check runs other shapes than traced), sequences up to
    the compiled module's limit."""
    try:
        return export_dynamic(gm, model.example_inputs,
                              dynamic_shapes(model, gm.meta[REPORT].max_tokens))
    except Exception as err:  # torch.export raises many types; all mean "cannot export"
        raise ArtifactError(f"cannot export the infer graph to {PROGRAM} with dynamic batch "
                            f"and sequence dims: {first_line(err)}") from err


class FailedWrites(io.RawIOBase):
    """A file torch.export.save writes through: the first OSError (disk full) is kept and
    later writes are dropped, so the archive writer finishes and save_program raises it.
    Writing to the path directly, the writer's C++ destructor met the same error again and
    aborted the process (`terminate called`, exit 134) instead of raising."""

    def __init__(self, file):
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.file.write(data)
            except OSError as err:
                self.error = err
        return len(data)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT that arrive inside the block are raised again when it ends. The
    archive writer is C++ calling back into FailedWrites.write; an exception raised there by
    the CLI's handlers (SystemExit, KeyboardInterrupt) aborted the process instead of
    unwinding, so the exit status and the staging cleanup were lost."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers, and only it runs them
        return
    arrived: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            signal.raise_signal(arrived[0])


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save into `path`; a write error is an OSError (as from `open`), which
    `atomic_directory` reports as an ArtifactError naming the output."""
    with open(path, "wb") as file:
        writes = FailedWrites(file)
        with signals_deferred():
            torch.export.save(program, writes)
    if writes.error is not None:
        raise writes.error


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load after registering what the program refers to: adaptc's fused ops
    and the pytree types of transformers' output classes. `path` is the .pt2 file or the
    artifact directory holding it."""
    import transformers.modeling_outputs  # noqa: F401  registers ModelOutput pytree nodes

    import adaptc.backends.triton  # noqa: F401  lazily: importing it imports triton

    path = Path(path)
    if path.is_dir():
        path = path / PROGRAM
    if not path.is_file():
        hint = f" (an infer artifact has {PROGRAM})" if path.name == PROGRAM else ""
        raise ArtifactError(f"{path}: no such program file{hint}")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: cannot load the exported program: not a zip archive "
                            "(a .pt2 file is one; this one is damaged or of another kind)")
    with held_log_records("torch.export") as records:
        try:
            return torch.export.load(str(path))
        except Exception as err:  # zip, pickle and schema errors alike mean "not a program"
            causes = [r.exc_info[1] for r in records if r.exc_info] + [err]
            raise ArtifactError(f"{path}: cannot load the exported program: "
                                f"{first_line(causes[0])}") from err


# --------------------------------------------------------------------------- hf/

def hf_blocker(gm: GraphModule, model: LoadedModel) -> str | None:
    """Why the infer graph has no plain Hugging Face equivalent, or None when it has one."""
    fused = [n.name for n in gm.graph.nodes if n.op == "call_function"
             and getattr(n.target, "namespace", None) == "adaptc"]
    if fused:
        return (f"{len(fused)} adapters run as fused ops (a checkpoint holds only merged "
                "updates and trained parameters)")
    kept = sorted({n.meta[INSERTED] for n in gm.graph.nodes if n.meta.get(INSERTED)
                   and not (n.op == "get_attr" and n.meta[INSERTED] == "train")})
    if kept:
        return (f"{', '.join(kept)} not folded into the base weights (a checkpoint holds only "
                "merged updates and trained parameters)")
    if not hasattr(model.module, "save_pretrained"):
        return f"{type(model.module).__name__} is not a Hugging Face model (no save_pretrained)"
    names: dict[int, list[str]] = {}
    for name, param in model.module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    for base in gm.meta.get(MERGED, {}):
        tied = names.get(id(model.module.get_parameter(base)), [])
        if len(tied) > 1 and read.intersection(tied):  # one tie reads the update, one does not
            return f"merged weight '{base}' is tied to {', '.join(n for n in tied if n != base)}"
    return None


def write_hf(gm: GraphModule, model: LoadedModel, folder: Path) -> None:
    """A copy of the user's model holding what the infer graph reads instead of its
    parameters (merged weights, trained copies: `gm.meta[MERGED]`); saved by save_pretrained."""
    merged_model = copy.deepcopy(model.module)
    with torch.no_grad():
        for base, target in gm.meta.get(MERGED, {}).items():
            merged_model.get_parameter(base).copy_(graph_tensor(gm, target))
    merged_model.save_pretrained(folder, safe_serialization=True)
    copy_tokenizer(model.source, folder)


# --------------------------------------------------------------------------- report.json

def verify(exported: torch.nn.Module, reference: GraphModule, model: LoadedModel,
           out: Path) -> dict:
    """Max absolute and relative error of `exported` against `reference` (eval) on random
    inputs; outputs that are not finite are an error naming `out`, the artifact."""
    inputs = random_inputs(model)
    was_training = reference.training
    reference.eval()
    with torch.no_grad():
        ours, theirs = exported(**inputs), reference(**inputs)
    reference.train(was_training)
    pairs = [(a, b) for a, b in zip(pytree.tree_leaves(ours), pytree.tree_leaves(theirs))
             if isinstance(a, torch.Tensor) and a.is_floating_point()]
    if not pairs:
        raise ArtifactError("the exported program returns no floating-point tensors to verify")
    broken = [name for name, side in (("the exported program", 0), ("the train-mode graph", 1))
              if not all(pair[side].isfinite().all() for pair in pairs)]
    if broken:  # the artifact was written, verified as 'max abs error nan'
        raise ArtifactError(f"{out}: not written: on random inputs {' and '.join(broken)} "
                            f"give{'s' * (len(broken) == 1)} NaN or infinite outputs (adapter "
                            "weights so large that the model's activations overflow?)")
    abs_error = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
    scale = max(b.float().abs().max().item() for _, b in pairs)
    return {"reference": "train-mode graph (eval), same spec and adapter weights",
            "inputs": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
            "max_abs_error": abs_error, "max_rel_error": abs_error / scale if scale else 0.0}


ID_RANGES = {"input_ids": "vocab_size", "decoder_input_ids": "vocab_size",  # config fields
             "token_type_ids": "type_vocab_size"}


def random_inputs(model: LoadedModel) -> dict:
    """Inputs like the example ones, with other batch and sequence sizes, 3 and 5 (dims are
    dynamic; an encoder-decoder's `decoder_*` inputs are two tokens shorter than the encoder's)."""
    batch, seq = 3, 5
    gen = torch.Generator().manual_seed(0)
    config = getattr(model.module, "config", None)
    inputs = {}
    for name, value in model.example_inputs.items():
        token_like = (isinstance(value, torch.Tensor) and value.dim() == 2
                      and not value.is_floating_point())
        length = max(1, seq - 2) if name.startswith("decoder_") else seq
        if not token_like:
            inputs[name] = value
        elif "mask" in name:  # one left-padded row
            mask = torch.ones((batch, length), dtype=value.dtype, device=value.device)
            mask[0, :1] = 0
            inputs[name] = mask
        else:
            high = getattr(config, ID_RANGES.get(name, ""), None) or int(value.max()) + 1
            inputs[name] = torch.randint(0, high, (batch, length), generator=gen).to(value)
    return inputs


def describe(gm: GraphModule, model: LoadedModel, why_no_hf: str | None, check: dict) -> dict:
    report = gm.meta[REPORT]
    return {"format": FORMAT, "mode": report.mode, "spec": report.spec_path,
            "spec_source": report.spec_source, "model": report.model,
            "inputs": sorted(model.example_inputs), "max_tokens": report.max_tokens,
            "counts": report.counts, "program": PROGRAM, "hf": HF_DIR if why_no_hf is None else None,
            **({"hf_skipped": why_no_hf} if why_no_hf else {}),
            "verification": check, "versions": versions()}


def compile_options(gm: GraphModule, model: LoadedModel) -> dict:
    """What besides the spec and the model decides the artifact, read from what ran: merge
    and fuse_projections from the pipeline, dtype and device from the model's weights (the
    dtype most of their elements have), the adapter weights file that was loaded with its
    sha256 (None: the initial weights)."""
    report = gm.meta[REPORT]
    sizes: dict[torch.dtype, int] = {}
    devices = set()
    for param in model.module.parameters():
        if param.is_floating_point():
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
            devices.add(str(param.device))
    dtype = max(sizes, key=sizes.get) if sizes else None
    return {"mode": report.mode, "merge": MergeWeights.name in report.pipeline,
            "fuse_projections": FuseProjections.name in report.pipeline,
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "device": ", ".join(sorted(devices)) or None,
            "adapters": gm.meta.get(ADAPTERS_FILE)}
