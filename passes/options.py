"""The options of every pass: frozen, documented dataclasses that validate their values when they are
constructed (``__post_init__``), naming the known values.

They live together in this module, which imports nothing heavy (no torch, onnx or numpy), so that
``mixexport build --option PASS.FIELD=VALUE`` checks a misspelled pass, field or value while the
command line is parsed — before torch is even imported, let alone anything exported. Each pass module
re-exports its class as ``Options``; :data:`BY_PASS` maps the CLI's pass names to them (a test checks
it against the pass table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from mixexport.errors import BadInputError

FORMS = ("hidden-slice", "stacked")
GRANULARITIES = ("per-token-channel", "per-channel", "per-tensor")
EMBEDDINGS = ("per-row", "per-column", "float")
#: How an int8 embedding table is read: ``gather-first`` (ONNX Runtime: gather int8 rows, dequantize
#: only them) or ``dequantize-first`` (TensorRT: DequantizeLinear straight on the int8 constant, then
#: Gather — TensorRT refuses any other reader of a quantized constant).
EMBEDDING_FORMS = ("gather-first", "dequantize-first")


def _one_of(pass_name: str, what: str, field: str, value: Any, known: tuple[str, ...]) -> None:
    if value not in known:
        raise BadInputError(f"{pass_name}: unknown {what} {value!r}; known: {', '.join(known)}",
                            f"e.g. --option {pass_name}.{field}={known[0]}")


def _at_least_zero(pass_name: str, field: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and value >= 0):  # also refuses NaN
        raise BadInputError(f"{pass_name}: {field} must be a number >= 0, found {value!r}",
                            f"e.g. --option {pass_name}.{field}=1e-5")


@dataclass(frozen=True)
class PackMoeExpertsOptions:
    """``form``: ``hidden-slice`` (default; concatenated hidden dims, gate per hidden slice) or
    ``stacked`` (``[E, T, ...]`` weights, one batched GEMM over all experts, Mul + ReduceSum)."""

    form: str = "hidden-slice"

    def __post_init__(self) -> None:
        _one_of("pack-moe-experts", "form", "form", self.form, FORMS)


@dataclass(frozen=True)
class SplitUserItemOptions:
    """``check_atol``: largest |difference| allowed between split and unsplit program outputs on
    the sample request before the pass's postcondition fails the build (>= 0)."""

    check_atol: float = 1e-5

    def __post_init__(self) -> None:
        _at_least_zero("split-user-item", "check_atol", self.check_atol)


@dataclass(frozen=True)
class ExtractKvCacheOptions:
    """``check_atol``: tolerance of the split-vs-unsplit and append checks (>= 0)."""

    check_atol: float = 1e-5

    def __post_init__(self) -> None:
        _at_least_zero("extract-kv-cache", "check_atol", self.check_atol)


@dataclass(frozen=True)
class QuantizeW8A16Options:
    """Options of ``quantize-w8a16``.

    granularity: scale granularity of MatMul/Gemm weights. ``per-token-channel`` (default): 2-D
        weights get one scale per output channel, per-token weights ``[T,D,H]`` one per (token,
        output channel), ``[T,1,H]`` (blocked DequantizeLinear). ``per-channel``: one scale per
        output channel shared by all tokens, ``[H]``. ``per-tensor``: one scale per weight.
    skip: shell-style name patterns (fnmatch) of initializers to keep in float; routers by default,
        since a flipped routing decision breaks parity (a token near a tie picks other experts; see
        the README's "Fuzzed parity").
    skip_head: also keep the head / towers (names matching ``HEAD_PATTERNS``) in float.
    skip_first / skip_last: keep the first / last MatMul-Gemm weight in graph order in float.
    embeddings: Gather tables ``[R,E]``: ``per-column`` (default): int8 with one scale per embedding
        dim, ``[E]``; ``per-row``: one scale per row, ``[R,1]``, gathered with the rows; ``float``:
        left as they are. Why per-column by default: embeddings are ~12 % of the tiny rankmixer's
        weights and the issue asks for ≤ 0.27× the fp32 weight bytes, which float tables cannot meet
        (0.35×), and a float32 scale per 16-wide row adds 25 % to each int8 row (0.274×, measured);
        per-column stays at 0.267×. Per-row halves the per-row error (0.4 % vs 0.9 % relative on the
        MovieLens tables) and costs only 4/E of the table: prefer it for E ≥ 64 or when the byte
        budget allows; the report gives every table's error and bytes either way.
    embedding_form: ``gather-first`` (default for ONNX Runtime targets): ``Gather(int8 table)`` →
        ``DequantizeLinear`` on the gathered rows, so only looked-up rows are dequantized;
        ``dequantize-first`` (the default ``mixexport build`` picks for ``--target trt``/``trt-rtx``):
        ``DequantizeLinear(int8 table, scale, axis)`` → ``Gather``, the only form in which TensorRT
        accepts a quantized constant (it keeps the table int8 in the engine).
    """

    granularity: str = "per-token-channel"
    skip: tuple[str, ...] = ("*router*",)
    skip_head: bool = False
    skip_first: bool = False
    skip_last: bool = False
    embeddings: str = "per-column"
    embedding_form: str = "gather-first"

    def __post_init__(self) -> None:
        _one_of("quantize-w8a16", "granularity", "granularity", self.granularity, GRANULARITIES)
        _one_of("quantize-w8a16", "embeddings mode", "embeddings", self.embeddings, EMBEDDINGS)
        _one_of("quantize-w8a16", "embedding_form", "embedding_form", self.embedding_form, EMBEDDING_FORMS)
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise BadInputError(f"quantize-w8a16: skip must be a tuple of name patterns, found {self.skip!r}",
                                "e.g. --option quantize-w8a16.skip='*router*,head.*'")


#: Activation scales of ``quantize-int8``: one per row (the last axis is the reduction axis K) or one
#: per tensor (ONNX ``DynamicQuantizeLinear``).
ACTIVATIONS = ("per-row", "per-tensor")


@dataclass(frozen=True)
class QuantizeInt8Options:
    """Options of ``quantize-int8`` (what ``--precision int8`` runs).

    activations: ``per-row`` (default): every row of a MatMul's input (its last axis is the one
        summed over) gets its own scale, ``max|row| / 127``, computed at run time; ``per-tensor``:
        one scale and zero point per call (``DynamicQuantizeLinear``), cheaper to compute but a
        single outlier row coarsens every other row (measured in the README).
    skip: shell-style name patterns (fnmatch) of weights to keep in float; routers by default (a
        flipped top-k decision moves a logit by a whole expert's output).
    skip_head: also keep the head / towers in float.
    """

    activations: str = "per-row"
    skip: tuple[str, ...] = ("*router*",)
    skip_head: bool = False

    def __post_init__(self) -> None:
        _one_of("quantize-int8", "activations mode", "activations", self.activations, ACTIVATIONS)
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise BadInputError(f"quantize-int8: skip must be a tuple of name patterns, found {self.skip!r}",
                                "e.g. --option quantize-int8.skip='*router*,head.*'")


#: storage dtypes of externalized table rows (see mixexport.tables.layout.DTYPES)
TABLE_DTYPES = ("float32", "float16", "int8")


@dataclass(frozen=True)
class ExternalizeEmbeddingsOptions:
    """Options of ``externalize-embeddings`` (docs/tables.md).

    min_bytes: tables of at least this many bytes go out (default 64 MiB), unless ``tables`` names them.
    tables: table names (``embed_item_table``) or parameter names (``embed.item_table.weight``) to take
        out, instead of the size threshold; a named table the pass must refuse is an error.
    dtype: how rows are stored: ``float32`` (exact), ``float16``, or ``int8`` with one float32 scale
        per row; the graph always receives float rows.
    partitions: part files per table; 0 (default) derives it from the stored size (one per 256 MiB).
    """

    min_bytes: int = 64 * 1024**2
    tables: tuple[str, ...] = ()
    dtype: str = "float32"
    partitions: int = 0

    def __post_init__(self) -> None:
        _one_of("externalize-embeddings", "dtype", "dtype", self.dtype, TABLE_DTYPES)
        _at_least_zero("externalize-embeddings", "min_bytes", self.min_bytes)
        if not (isinstance(self.partitions, int) and 0 <= self.partitions <= 1024):
            raise BadInputError(f"externalize-embeddings: partitions must be an integer in [0, 1024], found "
                                f"{self.partitions!r}", "e.g. --option externalize-embeddings.partitions=8 (0: derived)")
        if isinstance(self.tables, str) or not all(isinstance(t, str) for t in self.tables):
            raise BadInputError(f"externalize-embeddings: tables must be a tuple of names, found {self.tables!r}",
                                "e.g. --option externalize-embeddings.tables=embed_item_table,embed_seq_table")


#: The CLI's pass names → their options (the same classes as the pass table's ``PassInfo.options``).
BY_PASS: dict[str, type] = {"pack-moe-experts": PackMoeExpertsOptions, "split-user-item": SplitUserItemOptions,
                            "extract-kv-cache": ExtractKvCacheOptions, "quantize-w8a16": QuantizeW8A16Options,
                            "quantize-int8": QuantizeInt8Options,
                            "externalize-embeddings": ExternalizeEmbeddingsOptions}


def split_specs(specs: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """``("pass-name.field=value", …)`` → ``{pass name: {field: raw value}}``; the syntax only."""
    values: dict[str, dict[str, str]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        pname, dot, fname = key.partition(".")
        if not (eq and dot and pname and fname):
            raise BadInputError(f"--option {spec!r}: expected PASS.FIELD=VALUE",
                                "e.g. --option quantize-w8a16.granularity=per-token-channel")
        values.setdefault(pname, {})[fname] = value
    return values


def build_options(pass_name: str, given: Mapping[str, str], defaults: Mapping[str, Any] | None = None) -> Any:
    """The options of ``pass_name`` from raw ``--option`` values (coerced to each field's type),
    with ``defaults`` for fields not given (a target's choices), else the dataclass's own; raises
    :class:`BadInputError` naming the unknown pass, field or value."""
    if pass_name not in BY_PASS:
        raise BadInputError(f"--option {pass_name}.…: unknown pass {pass_name!r}; known passes: "
                            f"{', '.join(BY_PASS)}", "see `mixexport passes`")
    cls = BY_PASS[pass_name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in (defaults or {}).items() if k not in given}
    for fname, raw in given.items():
        if fname not in fields:
            raise BadInputError(f"--option {pass_name}.{fname}: unknown option; {pass_name} has "
                                f"{sorted(fields) or 'no options'}", "see `mixexport passes`")
        kwargs[fname] = coerce(pass_name, fname, raw, getattr(cls(), fname))
    return cls(**kwargs)


def coerce(pass_name: str, fname: str, raw: str, default: Any) -> Any:
    """An ``--option`` string as the type of the field's default (bool, tuple of strings, number…)."""
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(x for x in raw.split(",") if x)
        return type(default)(raw)
    except ValueError:
        raise BadInputError(f"--option {pass_name}.{fname}={raw!r}: expected {type(default).__name__}",
                            f"default is {default!r}") from None


def check_specs(specs: tuple[str, ...] | list[str]) -> None:
    """Validate ``--option`` values without loading anything: what the CLI runs while parsing."""
    for pass_name, given in split_specs(specs).items():
        build_options(pass_name, given)
