"""Pass (train mode): the base model's dropout follows the compiled module's train()/eval(),
as the model's own does when Hugging Face (and PEFT) fine-tune it.

Train mode traces the model in train mode (frontend/trace.py), so the graph holds its dropout
as traced, with the model's rates: nn.Dropout and F.dropout as `aten.dropout(x, p, True)`,
attention-probability dropout as scaled_dot_product_attention's `dropout_p` (GPT-2, BERT,
T5). Each such op then reads the module's mode from one call at the top of the graph:

    training = self.train_mode()                       TrainMode: its own `training` flag
    aten.dropout(x, p, True)     →  aten.dropout(x, p, training)
    sdpa(q, k, v, mask, p, …)    →  sdpa(q, k, v, mask, while_training(p, training), …)

`module.train()` and `module.eval()` reach `train_mode` with the rest of the module tree: in
train() the graph drops with the model's p, drawing the same random numbers in the same order
as the model in train() under one seed; in eval() it computes what the eval-mode graph does.
Runs after the insertion passes, which see the ops as traced. Infer mode traces in eval mode
(no dropout) and does not run this pass.
"""
from __future__ import annotations

from torch import nn
from torch.fx import GraphModule, Node

from adaptc.frontend.trace import DROPOUT_OPS
from adaptc.passes.base import CompileContext, PassResult
from adaptc.passes.graph import SDPA, sdpa_arg, set_sdpa_arg

TRAIN_MODE = "train_mode"  # the TrainMode submodule's name (a free variant if taken)


class TrainMode(nn.Module):
    """Gives the graph the compiled module's mode: `train()`/`eval()` set its flag with
    every other submodule's."""

    def forward(self) -> bool:
        return self.training


def while_training(p: float, training: bool) -> float:
    """An attention op's dropout rate: the model's `p` in train(), 0 in eval()."""
    return p if training else 0.0


class FollowTrainMode:
    name = "follow_train_mode"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        dropouts = [n for n in gm.graph.nodes if n.op == "call_function"
                    and n.target in DROPOUT_OPS and n.args[2:3] == (True,)]
        attentions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA
                      and sdpa_arg(n, "dropout_p", 0.0)]
        if not dropouts and not attentions:
            return PassResult(gm, {"dropout_following_mode": 0})
        training = mode_node(gm)
        for node in dropouts:
            node.update_arg(2, training)
        for node in attentions:
            with gm.graph.inserting_before(node):
                rate = gm.graph.call_function(
                    while_training, (sdpa_arg(node, "dropout_p"), training))
            rate.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
            set_sdpa_arg(node, "dropout_p", rate)
        return PassResult(gm, {"dropout_following_mode": len(dropouts) + len(attentions)})


def mode_node(gm: GraphModule) -> Node:
    """`training = self.train_mode()` after the graph's inputs, in the module's mode now."""
    name = TRAIN_MODE
    while hasattr(gm, name):
        name = f"_{name}"
    gm.add_submodule(name, TrainMode().train(gm.training))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.create_node("call_module", name, name="training")
