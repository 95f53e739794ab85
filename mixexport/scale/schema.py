"""The Parquet layout of labelled (user, candidate) rows, checked against a bundle's inputs, and the
conversion of a batch of rows into model feeds.

One row per (user, candidate). A column per bundle input, named as the input:

- a ``[batch]`` input is a scalar column of the input's dtype;
- a ``[batch, d1, d2, …]`` input (several id columns, a sequence, a behaviour grid) is a
  fixed-size list column of ``d1*d2*…`` values, row-major (a plain list column is accepted when
  every row has that length). A symbolic axis (``seq``) takes the file's list length.

Optional: a label column (0/1; bool, integer or float), a user key column (rows of one user are
contiguous within a file; without it, a change in any user-side input starts a new user), and a
reference column (float32 logits of task 0 written by the training pipeline).

Every problem is a :class:`BadInputError` naming the file and the column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec

_HINT_LIST = "write it as a fixed-size list column (pyarrow.list_(type, n)) of n = product of the non-batch axes"


@dataclass(frozen=True)
class Columns:
    """Which columns a run reads besides the inputs."""

    label: str | None
    key: str | None
    reference: str | None

    def extra(self) -> list[str]:
        return [c for c in (self.label, self.key, self.reference) if c]


def _value_type(spec: TensorSpec) -> str:
    return {"int64": "int64", "float32": "float", "int32": "int32", "float16": "halffloat",
            "float64": "double", "bool": "bool"}.get(spec.dtype, spec.dtype)


def check_schema(path: Path | str, schema: object, specs: tuple[TensorSpec, ...], columns: Columns) -> None:
    """Refuse a file whose Parquet schema lacks a column or has a wrong type or list length."""
    import pyarrow as pa

    names = set(schema.names)
    for name in [s.name for s in specs] + columns.extra():
        if name not in names:
            raise BadInputError(f"{path}: column {name!r} is missing (found {sorted(names)})",
                                "write one column per bundle input, named as the input (mixexport inspect BUNDLE)")
    for s in specs:
        _check_type(path, s, schema.field(s.name).type)
    if columns.label:
        t = schema.field(columns.label).type
        if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
            raise BadInputError(f"{path}: label column {columns.label!r} has type {t}, expected 0/1 as bool, "
                                "integer or float", "write the label as int8 or float32 0/1")
    if columns.reference:
        t = schema.field(columns.reference).type
        if not pa.types.is_floating(t):
            raise BadInputError(f"{path}: reference column {columns.reference!r} has type {t}, expected float "
                                "logits of the first output's task 0", "write the eager logits as float32")
    if columns.key:
        t = schema.field(columns.key).type
        if pa.types.is_nested(t) or pa.types.is_floating(t):
            raise BadInputError(f"{path}: key column {columns.key!r} has type {t}, expected integers or strings",
                                "write a user id per row")


def _check_type(path: Path | str, spec: TensorSpec, t: object) -> None:
    import pyarrow as pa

    inner = spec.shape[1:]
    want = _value_type(spec)
    if not inner:
        if str(t) != want:
            raise BadInputError(f"{path}: column {spec.name!r} has type {t}, expected {want} (input {spec.name}: "
                                f"{spec.dtype}{list(spec.shape)})", "cast the column to the input's dtype")
        return
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        raise BadInputError(f"{path}: column {spec.name!r} has type {t}, expected a list of {want} "
                            f"(input {spec.name}: {spec.dtype}{list(spec.shape)})", _HINT_LIST)
    if str(t.value_type) != want:  # type: ignore[attr-defined]
        raise BadInputError(f"{path}: column {spec.name!r} holds {t.value_type}, expected {want} "  # type: ignore[attr-defined]
                            f"(input {spec.name}: {spec.dtype}{list(spec.shape)})", "cast the column to the input's dtype")
    n = expected_length(spec)
    if pa.types.is_fixed_size_list(t) and n is not None and t.list_size != n:  # type: ignore[attr-defined]
        raise BadInputError(f"{path}: column {spec.name!r} has lists of {t.list_size} values, expected {n} "  # type: ignore[attr-defined]
                            f"(input {spec.name}: {spec.dtype}{list(spec.shape)})", _HINT_LIST)


def expected_length(spec: TensorSpec) -> int | None:
    """Values per row of a list input, or None where a symbolic axis takes the file's length."""
    inner = spec.shape[1:]
    return None if any(isinstance(d, str) for d in inner) else int(math.prod(inner))  # type: ignore[arg-type]


def column_array(path: str, spec: TensorSpec, column: object, rows: int) -> np.ndarray:
    """One input's ``[rows, …]`` array from a (chunked) Arrow column, its list lengths checked."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if col.null_count:  # type: ignore[attr-defined]
        raise BadInputError(f"{path}: column {spec.name!r} has {col.null_count} null values", "fill them before scoring")  # type: ignore[attr-defined]
    inner = spec.shape[1:]
    if not inner:
        return col.to_numpy(zero_copy_only=False).astype(spec.dtype, copy=False)  # type: ignore[attr-defined]
    if pa.types.is_fixed_size_list(col.type):  # type: ignore[attr-defined]
        size = col.type.list_size  # type: ignore[attr-defined]
        flat = col.flatten()  # type: ignore[attr-defined]
    else:
        offsets = col.offsets.to_numpy()  # type: ignore[attr-defined]
        lengths = np.diff(offsets)
        size = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != size).any():
            bad = int(np.flatnonzero(lengths != size)[0])
            raise BadInputError(f"{path}: column {spec.name!r} has lists of {int(lengths[bad])} values in one row and "
                                f"{size} in another; every row needs the same length", _HINT_LIST)
        flat = col.flatten()  # type: ignore[attr-defined]
    if flat.null_count:
        raise BadInputError(f"{path}: column {spec.name!r} has null values inside its lists", "fill them before scoring")
    want = expected_length(spec)
    if want is not None and size != want:
        raise BadInputError(f"{path}: column {spec.name!r} has lists of {size} values, expected {want} "
                            f"(input {spec.name}: {spec.dtype}{list(spec.shape)})", _HINT_LIST)
    symbolic = [i for i, d in enumerate(inner) if isinstance(d, str)]
    fixed = int(math.prod(d for d in inner if not isinstance(d, str)))  # type: ignore[misc]
    shape = [d if not isinstance(d, str) else 0 for d in inner]
    if symbolic:
        if len(symbolic) > 1 or (fixed and size % fixed):
            raise BadInputError(f"{path}: column {spec.name!r} has lists of {size} values, which do not fill "
                                f"input {spec.name}: {spec.dtype}{list(spec.shape)}", _HINT_LIST)
        shape[symbolic[0]] = size // fixed if fixed else 0
    return flat.to_numpy(zero_copy_only=False).astype(spec.dtype, copy=False).reshape([rows, *shape])


def label_array(path: str, name: str, column: object) -> np.ndarray:
    """Labels as float32 0/1; NaN, nulls or other values are refused."""
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if col.null_count:  # type: ignore[attr-defined]
        raise BadInputError(f"{path}: label column {name!r} has {col.null_count} null values",  # type: ignore[attr-defined]
                            "drop unlabelled rows")
    y = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)  # type: ignore[attr-defined]
    if np.isnan(y).any():
        raise BadInputError(f"{path}: label column {name!r} holds NaN (first at row {int(np.flatnonzero(np.isnan(y))[0])} "
                            "of a batch)", "drop unlabelled rows")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise BadInputError(f"{path}: label column {name!r} holds {y[bad][0]!r}, expected 0 or 1 (binary labels)",
                            "binarize the label (e.g. rating >= 4)")
    return y.astype(np.float32)


def reference_array(path: str, name: str, column: object) -> np.ndarray:
    import pyarrow as pa

    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    r = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32)  # type: ignore[attr-defined]
    if col.null_count or not np.isfinite(r).all():  # type: ignore[attr-defined]
        raise BadInputError(f"{path}: reference column {name!r} holds null, NaN or Inf values",
                            "write the eager logits for every row")
    return r
