"""The strings in a ``.pt2``'s ``models/*.json`` that torch would evaluate.

torch's deserializer parses every symbolic-shape ``expr_str`` with ``sympy.sympify``, which runs
Python ``eval`` with the builtins in scope: ``__import__('os').system(...)`` in a shape runs. An
expression is accepted only in the form ``sympy.srepr`` writes, e.g.
``Mul(Integer(2), Symbol('s0', positive=True, integer=True))``: allowlisted sympy and
``torch.utils._sympy.functions`` names, keyword arguments, numbers, identifier or number strings,
arithmetic and comparison operators; no attribute access, subscripts, lambdas or other names.

Generated graph code is ``exec``-ed by ``torch.fx``, and some strings reach it: the program's
``forward_arg_names`` become the parameters of ``forward`` (they must be Python identifiers), and
stack-trace text can become comments. A line break ends a line of Python source, so no string may
hold a control character (tab aside) and only ``stack_trace`` values may hold ``\\n``.
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from functools import lru_cache
from typing import Any

MAX_EXPR_CHARS = 20_000
MAX_DEPTH = 64
MAX_NODES = 5_000_000

_SYMPY_NAMES = frozenset("""
Symbol Dummy Integer Rational Float Add Mul Pow Max Min Mod Abs floor ceiling sqrt
Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan
And Or Not Xor Piecewise ExprCondPair Tuple true false oo zoo nan Infinity NegativeInfinity
S One Zero NegativeOne Half
positive negative nonnegative nonpositive integer real finite infinite zero nonzero even odd
prime commutative extended_real extended_positive extended_negative extended_nonnegative
extended_nonpositive rational irrational precision evaluate dummy_index
True False None
""".split())
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")
_STRING = re.compile(r"'([A-Za-z][A-Za-z0-9_]{0,99}|[-+]?[0-9]{1,400}(\.[0-9]{0,400})?([eE][-+]?[0-9]{1,5})?)'")
_OPS = frozenset("+ - * / // ** % ( ) , = < > <= >= == != & | ~".split())
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


@lru_cache(maxsize=1)
def _torch_sympy_names() -> frozenset[str]:
    import sympy
    import torch.utils._sympy.functions as f

    return frozenset(k for k, v in vars(f).items()
                     if isinstance(v, type) and issubclass(v, sympy.Basic) and not k.startswith("_"))


def check_expr(expr: str) -> str | None:
    """None if ``expr`` is a symbolic-shape expression as srepr writes it, else why not."""
    if len(expr) > MAX_EXPR_CHARS:
        return f"{len(expr)} characters, more than {MAX_EXPR_CHARS}"
    allowed = _SYMPY_NAMES | _torch_sympy_names()
    depth = 0
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError) as e:
        return f"not an expression ({str(e)[:60]})"
    for tok in tokens:
        kind, text = tok.type, tok.string
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER) and text.strip() == "":
            continue
        if kind == tokenize.NAME:
            if text not in allowed and not _SYMBOL_NAME.fullmatch(text):
                return f"name {text[:40]!r} is not a sympy shape function"
        elif kind == tokenize.NUMBER:
            if not re.fullmatch(r"[0-9][0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9]+)?", text):
                return f"number {text[:40]!r}"
        elif kind == tokenize.STRING:
            if not _STRING.fullmatch(text):
                return f"string {text[:40]!r} is not a plain name or number"
        elif kind == tokenize.OP and text in _OPS:
            depth += (text == "(") - (text == ")")
            if depth > MAX_DEPTH:
                return f"nested deeper than {MAX_DEPTH}"
        else:
            return f"token {text[:20]!r} is not allowed"
    return None


def check_program_strings(doc: Any) -> str | None:
    """None if every ``expr_str`` in the program JSON passes :func:`check_expr` and no string holds a
    control character other than tab and newline; else the first problem, with its JSON path."""
    stack: list[tuple[str, Any, str]] = [("$", doc, "")]
    nodes = 0
    while stack:
        path, value, key = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return f"more than {MAX_NODES} JSON values"
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}"[:200], v, k) for k, v in value.items())
            bad_key = next((k for k in value if _CONTROL.search(k)), None)
            if bad_key is not None:
                return f"key {bad_key[:60]!r} at {path} holds a control character"
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]"[:200], v, key + "[]") for i, v in enumerate(value))
        elif key == "forward_arg_names[]" and not isinstance(value, str):
            return f"{path} is {type(value).__name__}, not a Python identifier; torch.fx writes it into code"
        elif isinstance(value, str):
            if _CONTROL.search(value) or ("\n" in value and key != "stack_trace"):
                return (f"{path} holds a control character (a line break in anything but a stack trace "
                        "could end a line of the Python code torch.fx generates)")
            if key == "forward_arg_names[]" and not (value.isidentifier() and not keyword.iskeyword(value)):
                return f"{path} ({value[:60]!r}) is not a Python identifier; torch.fx writes it into code"
            if key == "expr_str":
                problem = check_expr(value)
                if problem:
                    return f"symbolic expression at {path} ({value[:60]!r}) refused: {problem}"
    return None
