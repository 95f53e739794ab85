"""The one name rule for everything a manifest names: segments, tensors, caches (and tables).

A manifest comes from outside, and its names end up where a name can do harm: a segment name
becomes a directory in a Triton repository (``<model>_<segment>/1/model.onnx``), a tensor name is
written into a ``config.pbtxt`` and read as a file name by the C++ example (``<input>.npy``). One
rule, checked when the manifest is read, by every reader (:mod:`mixexport.manifest_check`,
``examples/cpp/bundle.hpp``'s ``check_manifest_name``, the Triton writer):

    1 to 128 ASCII characters from ``A-Z a-z 0-9 _ . -``, the first not ``.`` or ``-``

So a name is never empty, ``.`` or ``..``, holds no path separator, quote, backslash, space,
control or non-ASCII character, and cannot be mistaken for a command-line option. Every name the
nine reference families and every pass write today fits it (surveyed by building each family with its
default passes: inputs ``user_cat``, ``seq_items``, ``seq_behaviours``, ``item_cat``, ``item_dense``,
output ``logit``; ``split-user-item``'s ``state_<i>`` and ``user_index``; ``extract-kv-cache``'s
``cache_<i>`` and cache ``kv``; segments ``model``, ``cache``, ``user``, ``item``), and so does every
name a ``.pt2`` program gets: its inputs are torch.fx node names (``[A-Za-z0-9_]``), its outputs
``output`` / ``output_<i>``. Symbolic axis names (``groups + 3``) are not names in this sense: they
never become a path or a config entry.
"""

from __future__ import annotations

import re

MAX_NAME = 128
#: the rule as a regular expression (``re.ASCII``: ``\\w`` would admit every Unicode letter)
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_NAME = re.compile(NAME_PATTERN, re.ASCII)
#: the rule in words, for error messages (and the same words in the C++ reader)
NAME_RULE = "1 to 128 characters from A-Z a-z 0-9 _ . -, not starting with '.' or '-'"


def name_problem(name: object) -> str | None:
    """Why ``name`` breaks the name rule (``None`` when it does not)."""
    if not isinstance(name, str):
        return f"it is {type(name).__name__}, not a string"
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME:
        return f"it has {len(name)} characters, more than {MAX_NAME}"
    if _NAME.fullmatch(name):
        return None
    bad = next((ch for ch in name if not (ch.isascii() and (ch.isalnum() or ch in "_.-"))), None)
    if bad is not None:
        return f"it holds {bad!r}"
    return f"it starts with {name[0]!r}"


def is_safe_name(name: object) -> bool:
    """Whether ``name`` obeys the name rule."""
    return name_problem(name) is None
