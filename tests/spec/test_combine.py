"""The combination table: complete over the methods, forbidden pairs located (E209)."""
from __future__ import annotations

from itertools import combinations

import pytest

from adaptc.errors import SpecError
from adaptc.methods import METHODS
from adaptc.spec import compile_spec
from adaptc.spec.combine import STACKING


def test_table_names_every_pair_of_statement_kinds():
    kinds = [*METHODS, "mixture"]
    assert set(STACKING) == {frozenset(pair) for pair in combinations(kinds, 2)}


@pytest.mark.parametrize("text,line,column,message", [
    ("attn: prefix\nattn[0]: ptuning2", 2, 10, "'ptuning2' cannot be combined with 'prefix'"),
    ("attn: ptuning2; attn: prefix", 1, 23, "'prefix' cannot be combined with 'ptuning2'"),
    ("attn[0]: prefix tokens=4\nattn[1]: prefix tokens=8", 2, 24,
     "prefix statements must use the same tokens (8 here, 4 on line 1)"),
])
def test_forbidden_combinations_are_located(text, line, column, message):
    with pytest.raises(SpecError) as caught:
        compile_spec(text, "c.adapt")
    (problem,) = caught.value.diagnostics
    assert (problem.code, problem.line, problem.column) == ("E209", line, column)
    assert message in problem.message


@pytest.mark.parametrize("text", [
    "q_proj,v_proj: lora r=8; attn: prefix tokens=10; ffn: adapter bottleneck=16",
    "ffn: adapter placement=parallel; attn: prefix tokens=30 projection=64",
    "q_proj: lora; attn: prefix; mixture moe k=1",
    "attn[0]: prefix tokens=4\nattn[1]: prefix tokens=4",
])
def test_allowed_combinations(text):
    compile_spec(text)
