"""Adapter weights in and out: the trainable state of a compiled module as safetensors.

Names follow the module path of the adapted layer (`model.layers.0.self_attn.q_proj.lora.A`);
the set of tensors comes from the adapter modules' protocol: `adapter_parameters()` (what
trains) plus, where a module has it, `frozen_state()` (tensors that do not train but are
needed to restore the adapter, such as LoRA-FA's frozen A).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from adaptc.errors import WeightsError
from adaptc.methods.mixture import Routed


SPEC_KEY = "adaptc.spec"
OPTIONS_KEY = "adaptc.options"  # JSON: "site method" → the options that change its outputs
ENCODERS = "adaptc"  # root submodule of a compiled graph: statement-wide prefix encoders


def adapter_modules(module: nn.Module) -> dict[str, nn.Module]:
    """By path in the compiled module, also through torch.compile's wrapper (its paths start
    with `_orig_mod.`, and a file saved under them loaded into no other module)."""
    module = getattr(module, "_orig_mod", module)
    return {name: m for name, m in module.named_modules() if hasattr(m, "adapter_parameters")}


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that restores the adapters: trainable ones, then frozen state."""
    return {f"{path}.{name}": tensor for path, m in adapter_modules(module).items()
            for name, tensor in adapter_tensors(m).items()}


def adapter_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    frozen = module.frozen_state() if hasattr(module, "frozen_state") else {}
    return {**module.adapter_parameters(), **frozen}


def save_adapters(module: nn.Module, path: str | Path) -> Path:
    """Write every adapter tensor to one safetensors file, atomically (temp file + rename).

    The metadata records the spec the module was compiled from, so a file loaded into a
    module of another spec is refused with the spec it belongs to, and each site's options
    that change its outputs (alpha, rslora, k, ...), which a loading module must share."""
    from adaptc.artifact import created_mode  # artifact and the compiler import this module
    path = Path(path)
    metadata = {"format": "pt", "producer": "adaptc"}
    report = compile_report(module)
    if report is not None and report.mode == "infer":
        raise WeightsError(f"{path}: an infer-mode module holds its adapters merged into its "
                           "weights or fused, not as adapter tensors; save the train-mode "
                           "module's adapters (the file mode='infer' was compiled with)")
    if report is not None:
        metadata[SPEC_KEY] = report.spec_source
        metadata[OPTIONS_KEY] = json.dumps(site_options(report.sites))
    tensors = adapter_state_dict(module)
    if any(t.is_meta for t in tensors.values()):
        raise WeightsError("cannot save adapters of a model on the meta device (it has no values)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, created_mode(directory=False))  # mkstemp's is 0600
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, SafetensorError) as err:
        raise WeightsError(f"{path}: cannot write adapter weights: "
                           f"{getattr(err, 'strerror', None) or err}") from err
    return path


ARTIFACT_ADAPTERS = "adapters.safetensors"  # the adapter file in a train-mode artifact
PEFT_CONVERT = ("`adaptc import-peft DIR --model MODEL -o spec.adapt --weights "
                "adapters.safetensors` converts the PEFT directory")


def site_options(sites: list[dict], prefix: str = "") -> dict[str, dict]:
    """"<prefix><site path> <method>" → its output-changing options, from report rows, in
    the form they take through JSON (lists, not tuples)."""
    return json.loads(json.dumps({f"{prefix}{row['path']} {row['method']}": row["options"]
                                  for row in sites if "options" in row}))


def check_adapter_file(path: str | Path) -> None:
    """What `load_adapters` refuses before it reads a tensor: a directory, a missing file, one
    that is not safetensors, damaged option metadata. The CLI checks `--adapters` with it
    before the model loads."""
    if Path(path).is_dir():
        peft = (Path(path) / "adapter_config.json").is_file()
        artifact = Path(path) / ARTIFACT_ADAPTERS
        raise WeightsError(f"{path}: is a directory, not an adapter weights file (the "
                           "safetensors file adaptc.save_adapters writes)"
                           + (f"\n  it holds a PEFT adapter: {PEFT_CONVERT}" if peft else "")
                           + (f"\n  it holds a train artifact's weights: pass {artifact}"
                              if artifact.is_file() else ""))
    try:
        with safe_open(str(path), "pt") as handle:
            saved = handle.metadata() or {}
    except (OSError, SafetensorError) as err:
        raise WeightsError(f"{path}: cannot read adapter weights: {err}") from None
    if OPTIONS_KEY in saved:
        filed_options(str(path), saved[OPTIONS_KEY])


def load_adapters(module: nn.Module, path: str | Path, prefix: str = "",
                  partial: bool = False, sites: list[dict] | None = None) -> None:
    """Copy tensors from a safetensors file into the module's adapters; all or nothing.

    `prefix` is prepended to the file's names: a module that wraps the compiled model (the
    KV-cache decoder holds it as `model`) loads a file saved from the unwrapped one. Names
    under ENCODERS (statement-wide encoders at the graph's root) stay as they are. `partial`
    skips the file's tensors the module has no adapter for (the module must still find all
    of its own). `sites`, the module's compile-report rows (by default its report's), must
    agree with the file's on every option that changes outputs at the sites both have:
    tensors trained with alpha=16 compute something else under alpha=32.
    """
    check_adapter_file(path)
    try:
        with safe_open(str(path), "pt") as handle:
            saved = handle.metadata() or {}
            saved_spec = saved.get(SPEC_KEY)
            tensors = {(k if k.startswith(f"{ENCODERS}.") else prefix + k): handle.get_tensor(k)
                       for k in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise WeightsError(f"{path}: cannot read adapter weights: {err}") from None
    if partial:
        own = adapter_state_dict(module)
        tensors = {k: v for k, v in tensors.items() if k in own}
    if OPTIONS_KEY in saved:
        if sites is None:
            report = compile_report(module)
            sites = [] if report is None else report.sites
        check_options(str(path), filed_options(str(path), saved[OPTIONS_KEY]), prefix, sites,
                      saved_spec)
    load_adapter_tensors(module, tensors, str(path), saved_spec, prefix)


def spec_text(value) -> str:
    """A value as a spec writes it: true/false, 16 rather than 16.0, names bare."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value)


def compile_report(module: nn.Module):
    """The CompileReport of a compiled module (also through torch.compile's wrapper)."""
    from adaptc.compiler import REPORT  # the compiler imports this module
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "meta", {}).get(REPORT)


def filed_options(path: str, text: str) -> dict[str, dict]:
    """The file's `adaptc.options` metadata: "site method" → {method: {option: value}}. A
    damaged entry (edited by hand, written by another tool) was a PassError from
    load_adapters with json's or Python's words ('list' object has no attribute 'items')
    and no file name."""
    try:
        saved = json.loads(text)
    except ValueError as err:
        raise WeightsError(f"{path}: the metadata entry '{OPTIONS_KEY}' is not JSON "
                           f"({err})") from None
    if not isinstance(saved, dict):
        raise WeightsError(f"{path}: the metadata entry '{OPTIONS_KEY}' holds a JSON "
                           f"{type(saved).__name__}; adaptc.save_adapters writes an object")
    for key, options in saved.items():
        if not (isinstance(options, dict)
                and all(isinstance(config, dict) for config in options.values())):
            raise WeightsError(f"{path}: the metadata entry '{OPTIONS_KEY}' has {key!r}: "
                               f"{json.dumps(options)}, not an object of options per method "
                               "as adaptc.save_adapters writes")
    return saved


def check_options(path: str, saved: dict[str, dict], prefix: str, sites: list[dict],
                  saved_spec: str | None) -> None:
    """Refuse a file whose adapters were trained with other output-changing options than the
    module's (names and shapes already match): name each differing site and option."""
    saved = {prefix + key: options for key, options in saved.items()}
    lines = []
    for key, options in site_options(sites).items():
        filed = saved.get(key)
        if filed is None:
            lines += relabelled(key, saved, prefix)
            continue
        if filed == options:
            continue
        site = key.split(" ", 1)[0].removeprefix(prefix)  # as the file names it
        for name, config in options.items():
            was = filed.get(name, {})
            changed = [f"{k}={spec_text(was.get(k))} in the file, {k}={spec_text(v)} here"
                       for k, v in config.items() if was.get(k) != v]
            if changed:
                lines.append(f"{site} {name}: " + "; ".join(changed))
    if lines:
        shown = "".join(f"\n  {line}" for line in lines[:5])
        more = f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else ""
        raise WeightsError(f"{path}: the adapters were trained with other options than the "
                           f"compiled module's, so they would compute other outputs "
                           f"({len(lines)} sites):{shown}{more}{saved_from(saved_spec)}")


def method_kind(label: str) -> str:
    """A report row's method without what it varies by: `adapter/parallel` → adapter,
    `moe[4]` → moe (a mixture's kinds, moe and loramoe, count as one: mixture)."""
    kind = label.split("/", 1)[0].split("[", 1)[0]
    return "mixture" if kind in ("moe", "loramoe") else kind


def relabelled(key: str, saved: dict[str, dict], prefix: str) -> list[str]:
    """The file's entry for the same site and kind of method under another label (a
    sequential adapter's for a parallel one, a `moe` mixture's for a `loramoe` one): the
    names and shapes match, the outputs do not."""
    path, label = key.split(" ", 1)
    return [f"{path.removeprefix(prefix)}: {other} in the file, {label} here"
            for other in (k.split(" ", 1)[1] for k in saved if k.split(" ", 1)[0] == path)
            if other != label and method_kind(other) == method_kind(label)]


def saved_from(saved_spec: str | None, own_spec: str | None = None) -> str:
    """The note on where a refused file came from: the spec it was saved from, or, when that
    is the module's own spec, that the model differs."""
    if saved_spec is None:
        return ""
    if own_spec is not None and own_spec.strip() == saved_spec.strip():
        return ("\n  the file was saved from a module compiled from the same spec onto another "
                "model (other layers or module names)")
    return ("\n  the file was saved from a module compiled from this spec:"
            + "".join(f"\n    {line}" for line in saved_spec.strip().splitlines()))


def load_adapter_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], source: str,
                         saved_spec: str | None = None, prefix: str = "") -> None:
    """Copy `tensors` (adapter state names → values) into the module; all or nothing.
    `saved_spec`, the spec the tensors were saved from, goes into the mismatch error; the
    names errors show leave out `prefix` (load_adapters' wrapper path), as the file has them."""
    path = source
    params = adapter_state_dict(module)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        detail = (f"missing {missing[0].removeprefix(prefix)}" if missing
                  else f"unexpected {extra[0].removeprefix(prefix)}")
        report = compile_report(module)
        origin = saved_from(saved_spec, None if report is None else report.spec_source)
        if any("base_model.model." in name for name in extra):
            origin += f"\n  these are PEFT's tensor names: {PEFT_CONVERT}"
        raise WeightsError(f"{path}: adapter tensors do not match the compiled module "
                           f"({len(missing)} missing, {len(extra)} unexpected; {detail})"
                           + origin)
    for name, param in params.items():
        tensor, shown = tensors[name], name.removeprefix(prefix)
        if tuple(tensor.shape) != tuple(param.shape):
            raise WeightsError(f"{path}: tensor '{shown}' has shape {tuple(tensor.shape)}, "
                               f"the compiled module expects {tuple(param.shape)}")
        if param.is_floating_point() and not tensor.is_floating_point():
            raise WeightsError(f"{path}: tensor '{shown}' has dtype {tensor.dtype}, "
                               f"the compiled module expects floating point ({param.dtype})")
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
            raise WeightsError(f"{path}: tensor '{shown}' holds NaN or infinite values "
                               "(did training diverge?)")  # float(): fp8 has no isfinite
        if param.is_floating_point() and not torch.isfinite(tensor.to(param.dtype).float()).all():
            raise WeightsError(f"{path}: tensor '{shown}' has values beyond the range of "
                               f"{param.dtype}, the compiled module's dtype")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def fold_prompts(module: nn.Module) -> int:
    """Replace every prompt encoder and prefix reparameterisation MLP by its current output, a
    frozen tensor: the graph then computes the same outputs with no encoder (for inference).
    Returns how many were folded. Saving still works; the folded tensors no longer train."""
    folded = 0
    for path, child in list(module.named_modules()):
        if path and callable(getattr(child, "fold", None)) and needs_folding(child):
            owner, _, name = path.rpartition(".")
            with torch.no_grad():
                setattr(module.get_submodule(owner), name, child.fold())
            folded += 1
    return folded


def needs_folding(child: nn.Module) -> bool:
    """P-tuning's encoder always; a prefix encoder only when it has the projection MLP."""
    return getattr(child.config, "projection", 1) > 0


def balance_loss(module: nn.Module, sample_types: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over mixture sites of weight × balancing loss from the last forward pass: Switch's
    load balance (`mixture moe`), or LoRAMoE's localized constraint, which reads each
    example's type (`sample_types` [B]: 1 world knowledge, 0 task)."""
    terms = [loss for m in module.modules() if isinstance(m, Routed)
             if (loss := m.balance_loss(sample_types)) is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())
