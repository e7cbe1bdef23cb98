"""Tracing: a model becomes a torch.fx GraphModule through `torch.export`.

transformers 5 has no fx tracer and `symbolic_trace` fails on its attention code, while
`torch.export` handles Llama, Mistral, Qwen2, GPT-2 and BERT, records each node's module
path in `meta["nn_module_stack"]`, and gives dynamic batch and sequence dimensions.
Infer mode traces the model in eval mode (no dropout). Train mode traces it in train mode, as
Hugging Face fine-tunes it, so its dropout is in the graph (`aten.dropout(x, p, True)`, the
attention ops' `dropout_p`); the `follow_train_mode` pass then makes those ops follow the
compiled module's train()/eval().
"""
from __future__ import annotations

import io
import logging
import sys
import traceback
import warnings
from contextlib import contextmanager, redirect_stderr

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from adaptc.errors import AdaptcError, ModelError, first_line
from adaptc.frontend.blocks import find_stack, replicate, restore_configs, shallow_model
from adaptc.frontend.models import LoadedModel


aten = torch.ops.aten
# random ops a train-mode graph may hold, each taking (input, p, train): nn.Dropout and its
# kin, F.dropout in eager attention; besides them only scaled_dot_product_attention's dropout_p
DROPOUT_OPS = frozenset({aten.dropout.default, aten.feature_dropout.default,
                         aten.alpha_dropout.default, aten.feature_alpha_dropout.default})
SDPA = aten.scaled_dot_product_attention.default


def trace(model: LoadedModel, reuse_blocks: bool = True, training: bool = False) -> GraphModule:
    """Export with dynamic batch and sequence dims; return a trainable GraphModule.

    With `reuse_blocks`, a stack of identical blocks is traced once and replicated
    (see frontend/blocks.py); otherwise, or when that does not apply (encoder-decoders have
    two stacks), the whole model. With `training` the model is traced in train mode, its
    dropout in the graph; a model whose train-mode forward does not export, or draws random
    numbers besides dropout (LayerDrop, router jitter: ops the graph would run in eval() too),
    is traced in eval mode instead, with a warning: its own dropout is then off.
    """
    if not training:
        return trace_in_mode(model, reuse_blocks, False)
    try:
        gm = trace_in_mode(model, reuse_blocks, True)
    except ModelError as err:
        why = f"its train-mode forward does not export ({err})"
    else:
        others = sorted({str(n.target) for n in gm.graph.nodes if random_besides_dropout(n)})
        if not others:
            return gm
        why = f"its train-mode forward draws random numbers besides dropout ({', '.join(others)})"
    gm = trace_in_mode(model, reuse_blocks, False)
    warnings.warn(f"{type(model.module).__name__}: traced in eval mode, so the model's own "
                  f"dropout is off in train() as well (adapter dropout is not): {why}",
                  stacklevel=2)
    return gm


def trace_in_mode(model: LoadedModel, reuse_blocks: bool, training: bool) -> GraphModule:
    if reuse_blocks and not is_encoder_decoder(model):
        stack = find_stack(model.module)
        small = shallow_model(model, stack[0]) if stack else None
        if small is not None:
            try:
                gm = export(small, training=training)
            finally:
                restore_configs(small)
            if replicate(gm, model.module, stack[0], len(stack[1])):
                gm.recompile()
                return gm
    return export(model, training=training)


def random_besides_dropout(node) -> bool:
    """A random op of the graph that is not a dropout (`DROPOUT_OPS`, attention's dropout_p)."""
    tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
    return (torch.Tag.nondeterministic_seeded in tags
            and node.target not in DROPOUT_OPS and node.target is not SDPA)


def export(model: LoadedModel, shapes: dict | None = None, training: bool = False) -> GraphModule:
    """Export the whole model, in eval mode or with `training` in train mode; `shapes`
    overrides the default dynamic dims."""
    module = model.module
    try:
        with tracing_state(module, training):
            program = export_dynamic(module, model.example_inputs,
                                     shapes or dynamic_shapes(model))
    except Exception as err:  # torch.export raises many types; all mean "cannot trace"
        raise ModelError(describe_failure(module, err)) from err
    graph_module = program.module()
    # torch.export forbids train()/eval() on its modules; adapters need them for dropout.
    for name in ("train", "eval"):
        graph_module.__dict__.pop(name, None)
    return graph_module


def export_dynamic(module: nn.Module, inputs: dict, shapes: dict,
                   positional: bool = False) -> torch.export.ExportedProgram:
    """torch.export over the named dynamic dims in `shapes`; failing that, the same dims as
    `Dim.AUTO`. `inputs` are passed by keyword, or in their order with `positional` (for
    graphs whose callers pass them so: the program checks calls against how it was traced).

    Some graphs carry shape guards that hold for every size but that a torch release cannot
    prove over a named range (torch 2.11 on the grouped-query `repeat_kv` of transformers'
    attention: min(32·s, 64·s) == 32·s; prompt tuning's padded inputs); with `Dim.AUTO`
    export keeps such a dim dynamic as far as the graph allows. A dim it specialises to the
    example's size instead is an error: the graph would accept only that size.
    """
    try:
        return quiet_export(module, inputs, shapes, positional)
    except Exception:  # retried below; when that fails too, its error is the one reported
        auto = {k: None if v is None else dict.fromkeys(v, Dim.AUTO) for k, v in shapes.items()}
        program = quiet_export(module, inputs, auto, positional)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for name, dims in shapes.items():
        for dim, spec in (dims or {}).items() if name in placeholders else ():
            size = placeholders[name].meta["val"].shape[dim]
            if spec is not Dim.AUTO and is_concrete_int(size):
                raise ValueError(f"torch {torch.__version__} could not keep dim {dim} of input "
                                 f"'{name}' dynamic: the graph would take size {size} only")
    return program


def quiet_export(module: nn.Module, inputs: dict, shapes: dict,
                 positional: bool = False) -> torch.export.ExportedProgram:
    """torch.export without the partial graph it prints to stderr when tracing stops on a
    data-dependent op (pages of generated code ahead of the one-line error we report) and
    the symbolic-shape logger's "Unable to find user code" warnings that come with it.
    Whatever else it writes to stderr (warnings) passes through."""
    captured = io.StringIO()
    partial = ""
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with redirect_stderr(captured):
            args, kwargs = (tuple(inputs.values()), {}) if positional else ((), dict(inputs))
            return torch.export.export(module, args, kwargs, dynamic_shapes=shapes,
                                       strict=False)
    except Exception as err:
        partial = str(getattr(err, "partial_fx_graph", "") or "")
        raise
    finally:
        shapes_log.setLevel(level)
        text = captured.getvalue()
        sys.stderr.write(text.replace(partial + "\n", "") if partial else text)


@contextmanager
def tracing_state(module: nn.Module, training: bool = False):
    """Eval mode (train mode with `training`) and no KV cache while exporting; the user's
    model is left as it was. Every config in the tree is switched off, since encoder-decoders
    (T5) give their decoder stack a config of its own."""
    configs = {id(c): c for m in module.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", None) is not None}
    use_cache = {key: config.use_cache for key, config in configs.items()}
    modes = {m: m.training for m in module.modules()}
    for config in configs.values():
        config.use_cache = False
    module.train(training)
    try:
        yield
    finally:
        for part, training in modes.items():
            part.training = training
        for key, config in configs.items():
            config.use_cache = use_cache[key]


OPTIONAL_INPUTS = ("token_type_ids",)  # all zeros when not given, as in transformers
INPUT_CHECK = "adaptc.input_check"  # gm.meta key: the module's InputCheck


class InputCheck:
    """A forward pre-hook for compiled modules: calls that do not fit the traced inputs
    (names, rank, integer or float) fail with a TypeError naming the input, instead of an
    IndexError or a dtype error from inside the graph, and so do token inputs longer than
    `max_tokens` (`why` says where that bound comes from). Token ids outside the vocabulary
    (`vocab_size`, when the model has one) are a ValueError on CPU tensors, where the
    embedding raised an IndexError; on a GPU the check would stall every call on a device
    sync, and the embedding's device assert reports them (meta tensors hold no ids).
    Optional inputs the call leaves out are filled in as transformers would, and integer
    inputs of another integer dtype (int32 ids, a bool mask, which transformers takes) are
    cast to the traced one. A floating-point input (a custom module's `example_inputs`) keeps
    its traced shape but for the batch dim: another size failed as the graph's "Guard failed"
    AssertionError. A module moved
    to another dtype or device after compiling (`module` the compiled one: its first
    floating-point weight says where it was) is an AdaptcError."""

    def __init__(self, example_inputs: dict, max_tokens: int, why: str,
                 vocab_size: int | None = None, module: nn.Module | None = None):
        self.expected = {name: (value.dim(), value.is_floating_point())
                         if isinstance(value, torch.Tensor) else None
                         for name, value in example_inputs.items()}
        self.integer_dtypes = {name: value.dtype for name, value in example_inputs.items()
                               if isinstance(value, torch.Tensor) and not value.is_floating_point()}
        self.fixed = {name: tuple(value.shape[1:]) for name, value in example_inputs.items()
                      if isinstance(value, torch.Tensor) and value.is_floating_point()}
        self.max_tokens, self.why, self.vocab_size = max_tokens, why, vocab_size
        weights = module.named_parameters() if module is not None else ()
        self.placed = next(((name, p.dtype, p.device) for name, p in weights
                            if p.is_floating_point()), None)

    def attach(self, gm: GraphModule) -> None:
        """Check the calls of `gm` and of its deep copies (GraphModule's deepcopy keeps no
        forward hooks: a copy ran unchecked)."""
        gm.meta[INPUT_CHECK] = self
        gm.register_forward_pre_hook(self, prepend=True, with_kwargs=True)
        gm._register_deepcopy_hook(reattach_input_check)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.check_placement(module)
        names = ", ".join(self.expected)
        if args:
            raise TypeError(f"the compiled module takes keyword inputs ({names}), "
                            f"got {len(args)} positional")
        defaults = {name: torch.zeros_like(kwargs["input_ids"]) for name in OPTIONAL_INPUTS
                    if name in self.expected and kwargs.get(name) is None
                    and isinstance(kwargs.get("input_ids"), torch.Tensor)}
        kwargs = {**kwargs, **defaults}
        missing = [name for name in self.expected if name not in kwargs]
        unexpected = [name for name in kwargs if name not in self.expected]
        if missing or unexpected:
            wrong = (f"missing input '{missing[0]}'" if missing
                     else f"unexpected input '{unexpected[0]}'")
            hint = (" (pass attention_mask=torch.ones_like(input_ids) for unpadded inputs)"
                    if "attention_mask" in missing else
                    " (pass decoder_input_ids, the labels shifted right behind the config's "
                    "decoder_start_token_id as transformers builds them, and compute the loss "
                    "from the output's logits)" if missing == ["decoder_input_ids"] else
                    " (compute the loss from the output's logits)" if "labels" in unexpected
                    else "")
            raise TypeError(f"{wrong}: the compiled module takes {names}{hint}")
        for name, traced in self.expected.items():
            value = kwargs[name]
            if traced is None:  # a non-tensor input: export checks its value
                continue
            rank, floating = traced
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"input '{name}' must be a tensor, got {type(value).__name__}")
            if value.dim() != rank or value.is_floating_point() != floating:
                kind = "floating-point" if floating else "integer"
                raise TypeError(f"input '{name}' must be a {rank}-D {kind} tensor (as traced), "
                                f"got {value.dim()}-D {value.dtype}")
            if floating and tuple(value.shape[1:]) != self.fixed[name]:
                raise ValueError(f"input '{name}' has shape {tuple(value.shape)}; the compiled "
                                 f"module takes (batch, {', '.join(map(str, self.fixed[name]))})"
                                 " as traced: only a floating-point input's batch dim is dynamic")
            if not floating and value.dtype != self.integer_dtypes[name]:
                kwargs[name] = value = value.to(self.integer_dtypes[name])
            if rank == 2 and not floating and value.shape[1] > self.max_tokens:
                raise ValueError(f"input '{name}' has {value.shape[1]} tokens; the compiled "
                                 f"module takes at most {self.max_tokens} ({self.why})")
        self.check_token_shapes(kwargs)
        self.check_vocabulary(kwargs)
        return args, kwargs

    def check_placement(self, module: nn.Module) -> None:
        """`.to(dtype)` or `.to(device)` after compiling moves the weights but not what the
        graph builds (positions, masks) nor its dtype assertions: the call failed inside the
        graph ("Tensor dtype mismatch", an attention dtype error)."""
        if self.placed is None:
            return
        name, dtype, device = self.placed
        weight = module.get_parameter(name)
        if (weight.dtype, weight.device) != (dtype, device):
            raise AdaptcError(f"the module was compiled with {dtype} weights on {device}, and "
                              f"'{name}' is now {weight.dtype} on {weight.device}: the graph "
                              "keeps the dtypes and devices it was traced with; place the "
                              "model before compiling (adaptc.load_model(..., dtype=..., "
                              "device=...) or model.to(...) before adaptc.compile)")

    def check_vocabulary(self, kwargs: dict) -> None:
        if not isinstance(self.vocab_size, int):
            return
        for name in self.expected:
            ids = kwargs[name]
            if not name.endswith("input_ids") or ids.device.type != "cpu":
                continue
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if bad.numel():
                raise ValueError(f"input '{name}' holds token id {bad[0].item()}, outside the "
                                 f"model's vocabulary (0..{self.vocab_size - 1})")

    def check_token_shapes(self, kwargs: dict) -> None:
        """Token inputs of one sequence (input_ids, attention_mask, ...; an encoder-decoder's
        decoder_* apart) share one non-empty [batch, tokens] shape, and the decoder's inputs
        the encoder's batch: a mismatch failed as the graph's "Guard failed" AssertionError,
        no tokens as a reshape error inside it."""
        first: dict[bool, tuple[str, tuple[int, ...]]] = {}
        for name, traced in self.expected.items():
            if traced != (2, False):
                continue
            shape = tuple(kwargs[name].shape)
            if 0 in shape:
                raise ValueError(f"input '{name}' is empty (shape {shape})")
            seen = first.setdefault(name.startswith("decoder_"), (name, shape))
            if seen[1] != shape:
                raise ValueError(f"input '{name}' has shape {shape} and input '{seen[0]}' "
                                 f"{seen[1]}: the token inputs of a sequence share one shape")
        if len({shape[0] for _, shape in first.values()}) > 1:
            (source, source_shape), (target, target_shape) = first[False], first[True]
            raise ValueError(f"input '{target}' has batch size {target_shape[0]} and input "
                             f"'{source}' {source_shape[0]}: each source row needs its row "
                             "of decoder inputs")


def reattach_input_check(gm: GraphModule) -> None:
    """Deepcopy hook: the copy's calls go through its copy of the check (its meta's)."""
    gm.register_forward_pre_hook(gm.meta[INPUT_CHECK], prepend=True, with_kwargs=True)


def sequence_limit(model: LoadedModel) -> int:
    """The longest token sequence a traced graph takes: the config's position count."""
    config = getattr(model.module, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 4096)


def is_encoder_decoder(model: LoadedModel) -> bool:
    return bool(getattr(getattr(model.module, "config", None), "is_encoder_decoder", False))


def dynamic_shapes(model: LoadedModel, max_tokens: int | None = None) -> dict | None:
    """Batch and sequence dims of 2-D integer inputs are dynamic (sequence up to
    `max_tokens`, by default the position limit; an encoder-decoder's `decoder_*` inputs
    have a sequence dim of their own); other tensors get a batch dim that export keeps
    dynamic where it can."""
    limit = max_tokens or sequence_limit(model)
    batch = Dim("batch", min=1)
    seq = {"": Dim("seq", min=1, max=limit), "decoder_": Dim("decoder_seq", min=1, max=limit)}
    shapes = {}
    for name, value in model.example_inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            shapes[name] = None
        elif value.dim() == 2 and not value.is_floating_point():
            shapes[name] = {0: batch, 1: seq["decoder_" if name.startswith("decoder_") else ""]}
        else:
            shapes[name] = {0: Dim.AUTO}
    return shapes


def describe_failure(module: nn.Module, err: Exception) -> str:
    """Name the innermost submodule whose forward was running when tracing failed."""
    names = {id(m): name for name, m in module.named_modules()}
    culprit = None
    for frame, _ in traceback.walk_tb(sys.exc_info()[2] or err.__traceback__):
        owner = frame.f_locals.get("self")
        if id(owner) in names:
            culprit = (names[id(owner)] or "<root>", type(owner).__name__)
    where = f" in module '{culprit[0]}' ({culprit[1]})" if culprit else ""
    return f"cannot trace {type(module).__name__} with torch.export{where}: {first_line(err)}"
