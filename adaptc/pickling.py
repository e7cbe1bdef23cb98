"""Pickling compiled modules: the last step of `adaptc.compile` makes its GraphModule a
`CompiledModule`, which `pickle`, `torch.save` and multiprocessing can serialise.

torch.fx's own `GraphModule.__reduce__` saves the generated code and traces it again when
loaded; on a module from `ExportedProgram.module()` it fails: the instance holds local
functions torch.export installs (two forward hooks, lambdas around
`_enter/_exit_enable_graph_inputs_of_type_nn_module`, and the `_guards_fn` submodule whose
forward is generated with `exec`), and its graph calls aten overloads, which do not pickle.
Tracing the code again would also lose what adaptc keeps on the nodes (`adaptc.*` meta,
`nn_module_stack`) and the pytree calling convention.

`CompiledModule.__reduce__` saves instead the graph's nodes (op, name, target, args, kwargs,
the picklable part of their meta; ops by their qualified name), its code generator, and the
module's state (submodules, parameters with their `requires_grad`, buffers, `meta`: the
compile report and the InputCheck). Loading rebuilds the same graph, so the same code runs:
identical outputs, trainable adapters, dropout following train()/eval(), the
`torch.ops.adaptc.*` calls of an infer-mode graph.

What the loaded module does not have, as with `copy.deepcopy` (GraphModule's deepcopy keeps
no forward hooks either): torch.export's forward hooks. One registers nn.Module-typed inputs
as pytree nodes (adaptc's inputs are tensors: it registers nothing); the other checks calls
against the shapes traced into the placeholders' fake values, which do not pickle
(`meta["val"]`). The compiled module's InputCheck, which runs first, still checks every call.
Export's shape guards (`_guards_fn`) are kept, rebuilt from their conditions
(`ExportGuards`).
"""
from __future__ import annotations

import ast
import dis
import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import _unlift
from torch.export._unlift import _StatefulGraphModule
from torch.fx import Graph, GraphModule, Node
from torch.fx.immutable_collections import immutable_dict, immutable_list

from adaptc.errors import AdaptcError

# node meta that is kept: where a node came from (greedy_generate reads nn_module_stack) and
# what adaptc recorded (`adaptc.*`). Fake values (`val`, `tensor_meta`) and provenance
# (`from_node`) are derived from tracing and do not pickle.
KEPT_META = ("nn_module_stack", "stack_trace", "torch_fn")
HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
         "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
GUARD_PREFIX = "Guard failed: "
# the module ExportedProgram.module() calls its guards through (torch releases before
# guard modules have none: isinstance(x, ()) is False)
GUARDS_MODULE = getattr(_unlift, "GuardsFn", ())


@dataclass(frozen=True)
class NodeRef:
    """A node in a saved node's args: its name."""
    name: str


@dataclass(frozen=True)
class OpRef:
    """An operator by name: `torch.ops.<namespace>.<name>[.<overload>]`."""
    namespace: str
    name: str
    overload: str | None

    def resolve(self):
        if self.namespace == "adaptc":
            import adaptc.backends.triton  # noqa: F401  registers torch.ops.adaptc.*
        packet = getattr(getattr(torch.ops, self.namespace), self.name)
        return packet if self.overload is None else getattr(packet, self.overload)


def encode(value: Any) -> Any:
    """`value` (a node's args, kwargs or meta) with nodes and operators replaced by names."""
    if isinstance(value, Node):
        return NodeRef(value.name)
    if isinstance(value, torch._ops.OpOverload):
        return OpRef(value.namespace, value._opname, value._overloadname)
    if isinstance(value, torch._ops.OpOverloadPacket):
        namespace, name = value._qualified_op_name.split("::")
        return OpRef(namespace, name, None)
    if isinstance(value, torch._ops.HigherOrderOperator):
        return OpRef("higher_order", value.name(), None)
    if type(value) in (list, tuple, immutable_list):
        return type(value)(encode(v) for v in value)
    if type(value) in (dict, immutable_dict):
        return type(value)((k, encode(v)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(encode(value.start), encode(value.stop), encode(value.step))
    return value


def decode(value: Any, nodes: dict[str, Node]) -> Any:
    if isinstance(value, NodeRef):
        return nodes[value.name]
    if isinstance(value, OpRef):
        return value.resolve()
    if type(value) in (list, tuple, immutable_list):
        return type(value)(decode(v, nodes) for v in value)
    if type(value) in (dict, immutable_dict):
        return type(value)((k, decode(v, nodes)) for k, v in value.items())
    if isinstance(value, slice):
        return slice(decode(value.start, nodes), decode(value.stop, nodes),
                     decode(value.step, nodes))
    return value


def save_graph(graph: Graph) -> dict:
    nodes = [(n.op, n.name, encode(n.target), encode(n.args), encode(n.kwargs), n.type,
              {k: encode(v) for k, v in n.meta.items()
               if k in KEPT_META or k.startswith("adaptc.")})
             for n in graph.nodes]
    return {"nodes": nodes, "codegen": graph._codegen, "tracer_cls": graph._tracer_cls,
            "tracer_extras": graph._tracer_extras}


def load_graph(saved: dict) -> Graph:
    graph = Graph(tracer_cls=saved["tracer_cls"], tracer_extras=saved["tracer_extras"])
    nodes: dict[str, Node] = {}
    for op, name, target, args, kwargs, type_expr, meta in saved["nodes"]:
        node = graph.create_node(op, decode(target, nodes), decode(args, nodes),
                                 decode(kwargs, nodes), name=name, type_expr=type_expr)
        if node.name != name:
            raise AdaptcError(f"loading a pickled compiled module: node '{name}' came back "
                              f"as '{node.name}'")
        node.meta.update({k: decode(v, nodes) for k, v in meta.items()})
        nodes[name] = node
    graph._codegen = saved["codegen"]
    return graph


class ExportGuards(nn.Module):
    """torch.export's input guards (`_guards_fn`: `torch._assert(<condition>, "Guard failed:
    <condition>")` per guard, over the graph's inputs) in a form that pickles: the input
    names and the conditions as text, the checking function made from them when loaded.
    torch generates its function with `exec` and keeps no source; the conditions are read
    back from the messages it asserts with, which spell each condition over the input names."""

    def __init__(self, names: list[str], conditions: list[str]):
        super().__init__()
        self.names, self.conditions = names, conditions
        self._is_impure = True  # a call with no users: dead-code elimination must keep it
        self.check = self.build()

    @classmethod
    def of(cls, guards: nn.Module, names: list[str]) -> ExportGuards:
        function = generated_function(guards.forward)
        code = list(dis.get_instructions(function)) if function else []
        messages = [i.argval for i in code if i.opname == "LOAD_CONST"
                    and isinstance(i.argval, str) and i.argval.startswith(GUARD_PREFIX)]
        conditions = [m.removeprefix(GUARD_PREFIX) for m in dict.fromkeys(messages)]
        if (function is None or len(messages) != sum(i.argval == "_assert" for i in code)
                or not reads_only(conditions, names)):
            raise AdaptcError("cannot pickle this compiled module: torch.export's input guards "
                              f"(`_guards_fn`, torch {torch.__version__}) are not in the form "
                              "adaptc reads (one `torch._assert(condition, 'Guard failed: "
                              "condition')` per guard); save the adapters "
                              "(adaptc.save_adapters) or write an artifact "
                              "(adaptc.write_artifact) instead")
        return cls(names, conditions)

    def build(self):
        """The check, generated as torch generates it (so dynamo traces through it too)."""
        source = f"def check({', '.join(self.names)}):\n  pass\n" + "".join(
            f"  torch._assert({c}, {GUARD_PREFIX + c!r})\n" for c in self.conditions)
        scope = guard_scope()
        exec(compile(source, "<adaptc export guards>", "exec"), scope)  # noqa: S102
        return scope["check"]

    def forward(self, *args):
        self.check(*args)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "check"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.check = self.build()


def guard_scope() -> dict:
    """The names torch.export's guard code may use (as `_convert_guards_code_to_fn` gives it)."""
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
    return {**SYMPY_INTERP, "math": math, "inf": math.inf, "torch": torch}


def reads_only(conditions: list[str], names: list[str]) -> bool:
    """Whether every condition is an expression over `names` and the guard scope."""
    known = {*names, *guard_scope()}
    try:
        trees = [ast.parse(c, mode="eval") for c in conditions]
    except SyntaxError:
        return False
    return all(n.id in known for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Name))


def generated_function(forward):
    """The function torch.export generated for `_guards_fn` (named `_`), unwrapped from the
    dynamo context manager around it (`dont_skip_tracing`, a closure); None if not found."""
    seen, todo = set(), [forward]
    while todo:
        function = todo.pop()
        if id(function) in seen or not callable(function):
            continue
        seen.add(id(function))
        if getattr(function, "__name__", None) == "_" and hasattr(function, "__code__"):
            return function
        todo.extend(cell.cell_contents for cell in getattr(function, "__closure__", None) or ()
                    if cell_is_filled(cell))
    return None


def cell_is_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: a closure variable not yet assigned
        return False
    return True


class CompiledModule(_StatefulGraphModule):
    """What `adaptc.compile` returns: the exported graph module, which also pickles."""

    def __reduce__(self):
        """(restore, (saved graph, state)): see the module docstring."""
        modules = type(self._modules)((name, picklable_submodule(self, name, module))
                                      for name, module in self._modules.items())
        state = {k: modules[k] if k in modules and self._modules[k] is v else v  # bind_ops'
                 for k, v in self.__dict__.items() if k not in ("_graph", *HOOKS)}
        state["_modules"] = modules
        state.update(kept_hooks(self))
        return restore, (save_graph(self.graph), state)


def picklable_submodule(gm: GraphModule, name: str, module: nn.Module | None):
    if not isinstance(module, GUARDS_MODULE):
        return module
    calls = gm.graph.find_nodes(op="call_module", target=name)
    names = [arg.name for arg in calls[0].args] if calls else []
    return ExportGuards.of(module, names)


def kept_hooks(gm: GraphModule) -> dict:
    """The module's forward hooks less torch.export's (see the module docstring); a hook
    that does not pickle (a local function) is an error naming it."""
    dropped = {handle for handle, hook in (*gm._forward_pre_hooks.items(),
                                           *gm._forward_hooks.items())
               if getattr(hook, "__module__", "") == "torch.export._unlift"}
    kept = {}
    for attr in HOOKS:
        table = getattr(gm, attr)
        kept[attr] = OrderedDict((h, v) for h, v in table.items() if h not in dropped)
    for attr in ("_forward_pre_hooks", "_forward_hooks"):
        for hook in kept[attr].values():
            try:
                pickle.dumps(hook)
            except Exception as err:
                raise AdaptcError(f"cannot pickle this compiled module: its forward hook "
                                  f"{hook!r} does not pickle ({err}); register hooks that "
                                  "are module-level functions or picklable objects") from err
    return kept


def restore(saved_graph: dict, state: dict) -> CompiledModule:
    """Unpickling: the module from its state and its graph rebuilt node by node."""
    module = CompiledModule.__new__(CompiledModule)
    module.__dict__.update(state)
    module.graph = load_graph(saved_graph)  # owning module, forward generated again
    return module


def compiled_module(gm: GraphModule) -> CompiledModule:
    """`gm` (from `ExportedProgram.module()`, through the passes) as a CompiledModule: the
    same state and graph, so the same forward."""
    module = CompiledModule.__new__(CompiledModule)
    module.__dict__.update(gm.__dict__)
    module.graph = gm.graph
    return module
