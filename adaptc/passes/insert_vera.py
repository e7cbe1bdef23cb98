"""Pass: add a VeRA update beside every linear node assigned `vera`.

    linear(x, W₀, b)  →  linear(x, W₀, b) + <site>.vera(x, vera_r<r>_seed<s>.A, vera_r<r>_seed<s>.B)

The shared frozen projections are registered once per (r, seed) at the graph module's root
(`vera_r256_seed0`), sized by the largest in/out dimension of the sites sharing them, and
reach each site's adapter as get_attr inputs.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from adaptc.frontend.targets import Assignment
from adaptc.methods.vera import VeraAdapter, VeraProjections
from adaptc.passes.base import SITE, CompileContext, PassResult, assigned, build_sized, report
from adaptc.passes.graph import factory, linear_input, linear_weight, splice


class InsertVera:
    name = "insert_vera"

    def run(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        todo = list(assigned(gm, "vera"))
        shared = self.register_projections(gm, ctx, todo)
        for node, assignment in todo:
            site, config = node.meta[SITE], assignment.rule.config
            name = shared_name(config)
            with gm.graph.inserting_before(node):
                A, B = (gm.graph.get_attr(f"{name}.{t}") for t in ("A", "B"))
            adapter = build_sized(
                ctx, assignment.rule, "r", f"'{site.path}'",
                lambda **kw: VeraAdapter(
                    config, site.in_features, site.out_features, **kw),
                **factory(gm, linear_weight(node).target))
            adapter.share(gm.get_submodule(name))
            splice(gm, node, linear_input(node), f"{site.path}.vera", adapter, "vera",
                   extra_args=(A, B))
            ctx.sites.append(report(site, "vera", assignment, adapter))
        return PassResult(gm, {"vera_inserted": len(todo), "vera_shared": shared})

    def register_projections(self, gm: GraphModule, ctx: CompileContext,
                             todo: list[tuple[Node, Assignment]]) -> int:
        """One VeraProjections per (r, seed), sized to the largest site that uses it."""
        sizes: dict[str, tuple] = {}
        for node, assignment in todo:
            rule, site = assignment.rule, node.meta[SITE]
            name = shared_name(rule.config)
            _, in_max, out_max = sizes.get(name, (rule, 0, 0))
            sizes[name] = (rule, max(in_max, site.in_features), max(out_max, site.out_features))
        like = factory(gm, linear_weight(todo[0][0]).target) if todo else {}
        for name, (rule, in_max, out_max) in sizes.items():
            config = rule.config
            gm.add_submodule(name, build_sized(
                ctx, rule, "r", f"the shared projections '{name}'",
                lambda **kw: VeraProjections(config.r, in_max, out_max, config.seed, **kw),
                **like))
        return len(sizes)


def shared_name(config) -> str:
    return f"vera_r{config.r}_seed{config.seed}"
