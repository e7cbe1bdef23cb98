"""Train-mode artifacts: a directory a training script loads in one line (`adaptc.load`).

    DIR/spec.adapt            the spec as compiled
    DIR/model/                the base model as a Hugging Face checkpoint (config + safetensors,
                              and the input's tokenizer files)
    DIR/adapters.safetensors  the adapter weights (initial, or as last saved)
    DIR/manifest.json         spec, model source, mode, counts, tensor names, versions

Loading rebuilds the graph from the spec and the checkpoint, so the loaded module is the
same kind of object `adaptc.compile` returns (dropout follows train()/eval(), mixtures
report their balance loss). The directory is written beside its destination and renamed
into place, so a failure never leaves a half-written output.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.fx import GraphModule

from adaptc.adapters import (
    ARTIFACT_ADAPTERS,
    adapter_state_dict,
    check_adapter_file,
    load_adapters,
    save_adapters,
)
from adaptc.compiler import REPORT, compile
from adaptc.errors import ArtifactError
from adaptc.frontend.models import PRESETS, LoadedModel, load_checkpoint, place
from adaptc.spec import load_spec, lower

FORMAT = 1
PROGRAM = "program.pt2"  # an infer artifact's exported program (export.py writes it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
                   # transformers 5 keeps the chat template out of tokenizer_config.json
                   "chat_template.jinja", "chat_template.json")
CHAT_TEMPLATES_DIR = "additional_chat_templates"  # named templates besides the default one


def versions() -> dict[str, str]:
    """adaptc, torch, transformers and Python, and triton where installed (the fused ops'
    kernels on a GPU), read without importing it."""
    import transformers

    from adaptc import __version__
    found = {"adaptc": __version__, "torch": torch.__version__,
             "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        found["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        pass
    return found


def write_artifact(gm: GraphModule, model: LoadedModel, out: str | Path, force: bool = False) -> Path:
    """Write the artifact for a train-mode compilation into `out`, atomically."""
    out = Path(out)
    refuse_existing(out, force)
    refuse_inputs(out, model_inputs(model))
    if gm.meta[REPORT].mode != "train":
        raise ArtifactError(f"{out}: write_artifact takes a train-mode module (an infer-mode "
                            "module has no adapter tensors to save); write_infer_artifact "
                            "exports an infer-mode one")
    if model.on_meta:
        raise ArtifactError(f"{out}: model '{model.source}' is on the meta device (shapes only); "
                            "an artifact needs real weights")
    if not hasattr(model.module, "save_pretrained"):
        raise ArtifactError(f"{out}: artifacts need a Hugging Face model (save_pretrained); "
                            f"got {type(model.module).__name__}")
    with atomic_directory(out) as staging:
        fill(staging, gm, model)
    return out


def refuse_existing(out: Path, force: bool) -> None:
    """An existing non-empty output is replaced only with `force` (--force). Checked before
    the work that fills it, as are a file where the path needs a directory, a mount point,
    and a directory to stage in that is not writable."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory")
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ArtifactError(f"{out}: cannot create the output directory: {blocking} is a file")
    if out.exists() and any(out.iterdir()) and not force:
        raise ArtifactError(f"{out}: output directory exists and is not empty (use --force)")
    # a container's volume, say: renaming onto it failed, EBUSY, after the work
    if os.path.ismount(os.path.realpath(out)):
        raise ArtifactError(f"{out}: a mount point, which the finished output cannot be "
                            f"renamed onto; write to a directory inside it (-o {out}/NAME)")
    place = Path(os.path.realpath(out))
    beside = next(p for p in place.parents if p.exists())  # where atomic_directory stages
    if not os.access(beside, os.W_OK | os.X_OK):  # a writable `out` in a read-only parent
        raise ArtifactError(f"{out}: {beside} is not writable (the output is assembled "
                            "there and renamed into place)")


def refuse_inputs(out: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that is, or is a directory above, one of the inputs (`(what, path)`:
    the model checkpoint, the adapter file, the spec, ...): writing the output replaces what
    is at its path, so --force would delete the input (after reading it)."""
    target = out.resolve()
    for what, path in inputs:
        if path is None or str(path) in ("", "-"):
            continue
        found = Path(path).resolve()
        if found == target or target in found.parents:
            relation = "is" if found == target else "contains"
            raise ArtifactError(f"{out}: the output {relation} the {what} '{path}' that this "
                                f"command reads; writing it would replace the {what} (with "
                                "--force, delete it): write the output elsewhere")


def copy_tokenizer(source: str | Path, folder: Path) -> None:
    """Copy the tokenizer files of checkpoint directory `source` (none for a preset) into
    `folder`, so a checkpoint written from the model encodes text as the input did."""
    if str(source) in PRESETS or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, folder / name)
    if (Path(source) / CHAT_TEMPLATES_DIR).is_dir():
        shutil.copytree(Path(source) / CHAT_TEMPLATES_DIR, folder / CHAT_TEMPLATES_DIR)


def model_inputs(model: LoadedModel) -> list[tuple[str, str]]:
    """The checkpoint directory a model was loaded from, as an input for `refuse_inputs`."""
    source = model.source
    if source in PRESETS or not Path(source).is_dir():
        return []
    return [("model checkpoint", source)]


def created_mode(directory: bool) -> int:
    """The permissions `open`/`mkdir` would give a new file or directory under the process's
    umask. Temporary files and directories are private (0600/0700); what is renamed into
    place from one gets these instead, so an output is as readable as any other."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_file(path: Path, text: str, force: bool) -> None:
    """Write `text` to `path` through a temporary file renamed into place; an existing file
    is replaced only with `force`. A symlink's file is the one replaced, as in
    `atomic_directory` (the rename replaced the link with a file)."""
    if path.exists() and not force:
        raise ArtifactError(f"{path}: file exists (use --force)")
    place = Path(os.path.realpath(path))
    try:
        handle = tempfile.NamedTemporaryFile("w", dir=place.parent,
                                             prefix=f".{place.name}.tmp-", delete=False)
        try:
            with handle:
                handle.write(text)
            Path(handle.name).chmod(created_mode(directory=False))
            Path(handle.name).replace(place)
        finally:
            Path(handle.name).unlink(missing_ok=True)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot write: {err.strerror or err}") from err


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A staging directory beside `out`, renamed to `out` when the block succeeds and removed
    when it fails, so `out` is either the old contents or complete new ones. A file-system
    error (no permission, disk full) becomes an ArtifactError naming `out`. `out` is placed
    by its real path: `.` or `dir/..` have no name to stage beside (`-o . --force` staged
    inside the output and failed to rename it, after the work), and a symlink's directory is
    the one to replace (renaming the link itself failed, 'Is a directory', after the work)."""
    place = Path(os.path.realpath(out))
    try:
        place.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=place.parent, prefix=f".{place.name}.tmp-"))
    except OSError as err:
        raise ArtifactError(f"{out}: cannot create the output directory: {err.strerror}") from err
    try:
        staging.chmod(created_mode(directory=True))  # mkdtemp's is 0700
        yield staging
        move_into_place(staging, place)
    except (OSError, SafetensorError) as err:  # save_pretrained's disk full is a SafetensorError
        raise ArtifactError(f"{out}: cannot write the output: "
                            f"{getattr(err, 'strerror', None) or err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_into_place(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`. An existing `out` is first renamed aside and deleted only
    once the new one is in place (deleting it first would leave a half-deleted or no output
    when the deletion or the rename fails); it is renamed back when the rename fails."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    try:
        out.rename(old)  # onto the empty directory mkdtemp made
    except OSError:
        old.rmdir()
        raise
    try:
        staging.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the output is complete: what is left is a hidden
    # directory beside it, not a reason to fail


def fill(folder: Path, gm: GraphModule, model: LoadedModel) -> None:
    report = gm.meta[REPORT]
    (folder / "spec.adapt").write_text(report.spec_source)
    model.module.save_pretrained(folder / "model", safe_serialization=True)
    copy_tokenizer(model.source, folder / "model")  # `--text` on a checkpoint made from it
    save_adapters(gm, folder / ARTIFACT_ADAPTERS)
    manifest = {
        "format": FORMAT, "mode": report.mode, "spec": report.spec_path, "model": report.model,
        "inputs": sorted(model.example_inputs), "counts": report.counts,
        "trainable_params": report.trainable, "all_params": report.total,
        "adapters": {k: list(v.shape) for k, v in adapter_state_dict(gm).items()},
        "versions": versions(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def load(folder: str | Path, *, dtype: str | None = None, device: str | None = None) -> GraphModule:
    """Rebuild the trainable module from an artifact directory and load its adapter weights.

    `dtype` and `device` place the saved model before tracing (as `load_model`): a compiled
    graph creates some tensors (positions, masks) on the device it was traced on, so train
    on the device given here rather than calling `.to()` on the result."""
    folder = Path(folder)
    manifest_file = folder / "manifest.json"
    if not manifest_file.is_file():
        if (folder / PROGRAM).is_file():
            raise ArtifactError(f"{folder}: an infer artifact ({PROGRAM}, no trainable "
                                f"graph); load it with adaptc.load_program('{folder}')")
        raise ArtifactError(f"{folder}: not an adaptc artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_file}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):  # was "unsupported artifact format None"
        raise ArtifactError(f"{manifest_file}: not an artifact manifest (a JSON "
                            f"{type(manifest).__name__}, not an object)")
    if "format" not in manifest:
        raise ArtifactError(f"{manifest_file}: no 'format' entry")
    found = manifest["format"]
    if found != FORMAT:
        raise ArtifactError(f"{manifest_file}: unsupported artifact format {found}")
    if "mode" not in manifest:
        raise ArtifactError(f"{manifest_file}: no 'mode' entry")
    if manifest["mode"] not in ("train", "infer"):
        raise ArtifactError(f"{manifest_file}: unknown mode {manifest['mode']!r} (train or infer)")
    plan = lower(load_spec(folder / "spec.adapt"))  # a damaged spec or adapter file was
    check_adapter_file(folder / ARTIFACT_ADAPTERS)   # found after the checkpoint had loaded
    model = place(load_checkpoint(folder / "model", dtype), dtype, device)
    gm = compile(model, plan, manifest["mode"])
    load_adapters(gm, folder / ARTIFACT_ADAPTERS)
    return gm
