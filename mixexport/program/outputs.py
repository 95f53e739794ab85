"""Output names of a user's program, whatever pytree its ``forward`` returns.

Every later stage (ONNX, engines, the manifest, Triton, the C++ example) sees a flat list of named
tensors; the program's output pytree only decides the names:

- one tensor: ``output``;
- a tuple or list at the top: ``output_<i>`` (as before dict support);
- a dict: its keys;
- nested containers: the path of keys and indices joined with :data:`SEPARATOR`, so
  ``{"ctr": t, "aux": {"cvr": t, "l": [t]}}`` gives ``ctr``, ``aux.cvr``, ``aux.l.0``, and
  ``(t, {"a": t})`` gives ``output_0``, ``output_1.a``.

``.`` is the separator because the manifest's name rule (:mod:`mixexport.names`) admits it, ONNX and
Triton accept it in tensor names, and a Python identifier (the usual dict key) never holds it, so a
joined name cannot collide with a plain key. A key that breaks the name rule, or names that collide,
are refused in one line: renaming silently would make the bundle's names differ from the model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from mixexport.errors import BadInputError
from mixexport.names import NAME_RULE, name_problem

SEPARATOR = "."


def output_names(out_spec: pytree.TreeSpec | None, count: int) -> list[str]:
    """The names of the ``count`` flat outputs of a program whose output pytree is ``out_spec``."""
    if out_spec is None or out_spec.is_leaf():
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    skeleton = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    paths = [path for path, _ in pytree.tree_flatten_with_path(skeleton)[0]]
    if len(paths) != count:
        raise BadInputError(f"the program's output structure holds {len(paths)} leaves but its graph "
                            f"returns {count} tensors", "return tensors (or dicts/tuples/lists of tensors)")
    names = [_join(path, top_sequence=isinstance(skeleton, (tuple, list))) for path in paths]
    if len(names) == 1 and isinstance(skeleton, (tuple, list)):
        names = ["output"]  # a 1-tuple is served as one output, as it always was
    for name in names:
        why = name_problem(name)
        if why is not None:
            raise BadInputError(f"output name {name!r} (from the model's output keys) breaks the name rule: "
                                f"{why}", f"rename the dict keys the model returns ({NAME_RULE})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"output names {dup} occur twice (keys joined with {SEPARATOR!r})",
                            "rename the dict keys the model returns")
    return names


def _join(path: tuple[Any, ...], top_sequence: bool) -> str:
    parts = []
    for depth, key in enumerate(path):
        if isinstance(key, pytree.SequenceKey):
            parts.append(f"output_{key.idx}" if depth == 0 and top_sequence else str(key.idx))
        elif isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        else:  # namedtuple field or a registered container's key: its own spelling
            parts.append(str(getattr(key, "name", key)).lstrip("."))
    return SEPARATOR.join(parts)


def flat_outputs(out: Any) -> Any:
    """The program's outputs as the flat tuple every stage serves (one tensor stays a tensor)."""
    leaves = pytree.tree_leaves(out)
    bad = [type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor)]
    if bad:
        raise BadInputError(f"the model returns non-tensor values ({', '.join(sorted(set(bad)))})",
                            "return only tensors (in dicts, tuples or lists)")
    return leaves[0] if len(leaves) == 1 else tuple(leaves)
