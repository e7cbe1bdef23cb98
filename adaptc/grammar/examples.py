"""Known-bad snippets and terminal names in user words, for syntax error messages.

Used by `grammar.explain` (via Lark's `UnexpectedInput.match_examples`) when `spec.parse`
turns a Lark error into a diagnostic. A label matches an error that stops the parser in
the same state; among labels for one state, the first wins unless a later one's example
fails on the same kind of token (so put the general message first, special cases after).
Labels that start with "expected" get ", found X" appended; the others are whole sentences.
"""
from __future__ import annotations

UNCLOSED_LIST = "unclosed list: expected ']'"

KNOWN_BAD: dict[str, list[str]] = {
    # ---- statement start ----
    "expected a target pattern (like q_proj) or 'mixture' at the start of a statement":
        ["8: lora", "q: lora\n8: lora", "q: lora; 8: lora"],
    "expected a mixture kind after 'mixture' (a keyword at the start of a statement)":
        ["mixture", "mixture: lora"],
    # ---- targets and layer selections ----
    "expected ':' after the targets":
        ["q_proj lora r=8", "q_proj[0:2] lora", "q_proj[:2] lora", "q_proj[0] lora",
         "q_proj[0, 1] lora"],
    "expected a target pattern after ','": ["q_proj,: lora", "q_proj,"],
    "expected a layer index or slice after '['": ["q_proj[a]: lora"],
    "empty layer selection: write [start:stop] or [i, j, ...]": ["q_proj[]: lora"],
    "expected ':', ',' or ']' after the layer index": ["q_proj[1 2]: lora", "q_proj[1"],
    "expected ']' to close the layer selection":
        ["q_proj[1:2 lora", "q_proj[1:", "q_proj[1, 2 lora"],
    "expected a layer index after ','": ["q_proj[1,]: lora"],
    # ---- method and options ----
    "expected a method name after ':'": ["q_proj:", "q_proj: 8"],
    "expected key=value options, ';' or a newline":
        ["q: lora 8", "q: lora r=8 8", "q: lora r=8.5 8", "q: lora a=b 8", "q: lora a='b' 8",
         "q: lora a=[] 8", "mixture moe 8", "q: lora r=8 ]", "q: lora r=8 a=1 ]",
         "mixture moe k=2 ]", "mixture moe k=2 r=1 ]"],
    "expected '=' or another option": ["q: lora r 8"],
    "expected a value after '='": ["q: lora r="],
    "'==' is not an operator: write key=value": ["q: lora r==8"],
    # ---- lists ----
    "expected a value or ']' in the list": ["q: lora a=[:]"],
    "expected a value after ','": ["q: lora a=[1, :]"],
    "trailing ',' in a list: add a value or remove the ','": ["q: lora a=[1,]"],
    "expected ',' between list items":
        ["q: lora a=[1 2]", "q: lora a=[1.5 2]", "q: lora a=[b 2]", "q: lora a=['b' 2]",
         "q: lora a=[[] 2]"],
    UNCLOSED_LIST:
        ["q: lora a=[", "q: lora a=[\n", "q: lora a=[1,", "q: lora a=[1,\n", "q: lora a=[1, 2",
         "q: lora a=[1", "q: lora a=[1.5", "q: lora a=[b", "q: lora a=['b'", "q: lora a=[[]",
         "q: lora a=[1 r=2"],
    # ---- strings (lexer errors: matched by state and the offending quote) ----
    "unclosed string: add the closing \" on the same line":
        ['q: lora a="b', 'q: lora a=["b'],
    "unclosed string: add the closing ' on the same line":
        ["q: lora a='b", "q: lora a=['b"],
}

# What each terminal of adapt.lark is called in messages.
TERMINAL_WORDS: dict[str, str] = {
    "PATTERN": "a target pattern",
    "NAME": "a name",
    "MIXTURE": "'mixture'",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
    "_COLON": "':'",
    "_COMMA": "','",
    "_EQ": "'='",
    "_LBRACK": "'['",
    "_RBRACK": "']'",
    "_SEMI": "';'",
    "_NL": "a newline",
    "$END": "the end of input",
}
