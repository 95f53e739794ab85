"""Optimization profiles for TensorRT engines, derived from what the model declares.

A TensorRT engine with dynamic axes needs one (min, opt, max) per dynamic dimension of every input,
and every shape in that box must be one the graph can run: a LONGER sequence that is not a whole
number of merge groups fails its Reshape ("dimension of -1 has no solution"), fewer groups than the
model reads fails a Gather, and two inputs that share an axis must agree at min, opt and max.

So profiles are resolved per **axis**, not per input:

- a *base* axis (``batch``, ``users``, ``candidates``, ``groups``…) takes ``--shapes NAME:MIN,OPT,MAX``,
  else :data:`DEFAULT_PROFILE`;
- an axis the model declares as a *multiple* of another (``multiples = {"seq": ["groups", 4]}``: the
  sequence length is 4 · groups) is derived from its base, never given a box of its own; a ``--shapes``
  on it is turned into its base's box (MIN rounded up, MAX down to a whole multiple);
- *minimums* the model declares (``{"groups": 8}``: LONGER reads the 8 most recent groups) raise MIN;
- *maximums* the model declares (a ``.pt2`` exported with ``Dim("seq", min=2, max=200)``) cap MAX and
  OPT, and give an axis with no default box one from its range (MIN, the middle, MAX); a ``--shapes``
  past the maximum is refused;
- an axis written as an expression of others (``groups + 3``, from torch.export's symbolic shapes) is
  evaluated from theirs at min, opt and max (only +, -, * and // with integer constants).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Iterable, Mapping, Sequence

from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec

Profile = tuple[int, int, int]
#: (min, opt, max) of the base axes. Rows ``batch`` and ``candidates`` 1 / 256 / 4096 (256 is the
#: middle of the N range the latency report covers; 4096 bounds the activation memory TensorRT
#: reserves), ``users`` 1 / 1 / 256 (serving is 1 user × N), ``seq`` 1 / 128 / 1024 behaviours.
DEFAULT_PROFILE: dict[str, Profile] = {
    "batch": (1, 256, 4096),
    "candidates": (1, 256, 4096),
    "users": (1, 1, 256),
    "seq": (1, 128, 1024),
}
_SHAPE_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*):(?P<values>[^:]+)$")
_HINT = "e.g. --shapes candidates:1,256,4096"


def parse_shapes(specs: Iterable[str]) -> dict[str, Profile]:
    """``--shapes NAME:MIN,OPT,MAX`` (repeatable) → {axis: (min, opt, max)}.

    Raises :class:`BadInputError` for a malformed value, a non-positive size, MIN <= OPT <= MAX not
    holding, or an axis given twice.
    """
    out: dict[str, Profile] = {}
    for spec in specs:
        m = _SHAPE_RE.match(spec.strip())
        values = m.group("values").split(",") if m else []
        try:
            nums = tuple(int(v) for v in values)
        except ValueError:
            nums = ()
        if not m or len(nums) != 3:
            raise BadInputError(f"--shapes {spec!r}: expected NAME:MIN,OPT,MAX with three integers", _HINT)
        name = m.group("name")
        lo, opt, hi = nums
        if lo < 1:
            raise BadInputError(f"--shapes {spec!r}: sizes must be >= 1", _HINT)
        if not lo <= opt <= hi:
            raise BadInputError(f"--shapes {spec!r}: need MIN <= OPT <= MAX, found {lo}, {opt}, {hi}", _HINT)
        if name in out:
            raise BadInputError(f"--shapes gives axis {name!r} twice", "give each axis once")
        out[name] = (lo, opt, hi)
    return out


def axis_profile(name: str, shapes: Mapping[str, Profile]) -> Profile:
    """The (min, opt, max) of one base axis: ``--shapes`` first, then the defaults."""
    if name in shapes:
        return shapes[name]
    if name in DEFAULT_PROFILE:
        return DEFAULT_PROFILE[name]
    raise BadInputError(f"symbolic axis {name!r} has no default optimization profile",
                        f"give it one: --shapes {name}:MIN,OPT,MAX")


def _names(expr: str) -> set[str]:
    """The axis names an axis expression reads (``groups + 3`` → {groups})."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise BadInputError(f"symbolic axis {expr!r} is not an expression mixexport can read",
                            "rebuild the bundle; report this model if it persists") from None
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b}


def eval_axis(expr: str, values: Mapping[str, int]) -> int:
    """Value of an axis expression for given base-axis values (+, -, *, // and integers only)."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Name):
            return int(values[node.id])
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise BadInputError(f"symbolic axis {expr!r} uses an operation profiles cannot derive",
                            "give the segment inputs plain axis names")

    return ev(ast.parse(expr, mode="eval"))


def resolve_axes(axes: Iterable[str], shapes: Mapping[str, Profile],
                 multiples: Mapping[str, Sequence[Any]] | None = None,
                 minimums: Mapping[str, int] | None = None,
                 maximums: Mapping[str, int] | None = None) -> dict[str, Profile]:
    """One consistent (min, opt, max) per symbolic axis (names and expressions) of a bundle."""
    multiples = {k: (str(v[0]), int(v[1])) for k, v in (multiples or {}).items()}
    minimums = dict(minimums or {})
    maximums = {k: int(v) for k, v in (maximums or {}).items()}
    axes = set(axes)
    names = set().union(*(_names(a) for a in axes)) if axes else set()
    derived = {n: multiples[n] for n in names if n in multiples}
    bases = (names - set(derived)) | {b for b, _ in derived.values()}
    given = dict(shapes)
    for axis, (base, k) in derived.items():      # a box given on a derived axis moves to its base
        if axis not in given:
            continue
        lo, opt, hi = given.pop(axis)
        box = (math.ceil(lo / k), max(1, round(opt / k)), hi // k)
        if base in given and given[base] != box:
            raise BadInputError(f"--shapes {axis} and --shapes {base} disagree: {axis} is {k}·{base}",
                                f"give only one of them, e.g. --shapes {base}:{box[0]},{box[1]},{box[2]}")
        if box[2] < 1:
            raise BadInputError(f"--shapes {axis}:{lo},{opt},{hi}: {axis} is a multiple of {k}, and no "
                                f"multiple of {k} fits under {hi}", f"raise MAX to at least {k}")
        given[base] = box
    profiles: dict[str, Profile] = {}
    for base in bases:
        if base in given or base in DEFAULT_PROFILE:
            lo, opt, hi = axis_profile(base, given)
        elif base in maximums:  # a .pt2's bounded axis with no default box: its own range
            lo, hi = max(1, minimums.get(base, 1)), maximums[base]
            opt = (lo + hi + 1) // 2
        else:  # a base read only through a derived axis with a default box (groups from seq)
            via = next(((a, k) for a, (b, k) in multiples.items() if b == base and a in DEFAULT_PROFILE), None)
            if via is None:
                axis_profile(base, given)  # raises: no profile for this axis
            a, k = via
            dlo, dopt, dhi = DEFAULT_PROFILE[a]
            lo, opt, hi = math.ceil(dlo / k), max(1, round(dopt / k)), max(1, dhi // k)
        need = minimums.get(base, 1)
        if base in given and given[base][2] < need:
            raise BadInputError(f"--shapes {base}: MAX {given[base][2]} is below the {need} the model needs",
                                f"the model reads at least {need} along {base}")
        lo = max(lo, need)
        cap = maximums.get(base)
        if cap is not None:
            if base in given and given[base][2] > cap:
                raise BadInputError(f"--shapes {base}: MAX {given[base][2]} is above the {cap} the model allows",
                                    f"the program was exported with {base} <= {cap}")
            if lo > cap:
                raise BadInputError(f"axis {base}: MIN {lo} is above the {cap} the model allows",
                                    f"give --shapes {base}:MIN,OPT,MAX inside the model's range")
            hi, opt = min(hi, cap), min(opt, cap)
        profiles[base] = (lo, max(opt, lo), max(hi, lo))
    for axis, (base, k) in derived.items():
        profiles[axis] = tuple(k * v for v in profiles[base])  # type: ignore[assignment]
        need = minimums.get(axis)
        if need and profiles[axis][0] < need:
            raise BadInputError(f"axis {axis} = {k}·{base} is {profiles[axis][0]} at MIN, below the {need} "
                                "the model needs", f"raise MIN of --shapes {base}")
    for axis in axes - set(profiles):
        values = [{n: profiles[n][i] for n in _names(axis)} for i in range(3)]
        box = tuple(eval_axis(axis, v) for v in values)
        if not 1 <= box[0] <= box[1] <= box[2]:
            raise BadInputError(f"axis {axis!r} evaluates to {box} over the profile, not an increasing "
                                "box of sizes >= 1", "set the base axes' boxes with --shapes")
        profiles[axis] = box  # type: ignore[assignment]
    return profiles


def derive_profile(inputs: Sequence[TensorSpec], shapes: Mapping[str, Profile],
                   multiples: Mapping[str, Sequence[Any]] | None = None,
                   minimums: Mapping[str, int] | None = None,
                   maximums: Mapping[str, int] | None = None
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per input: the (min, opt, max) shapes of one optimization profile. Static dims stay fixed;
    every symbolic dim takes its axis' resolved box (:func:`resolve_axes`), so inputs sharing an
    axis agree and derived axes follow their base."""
    axes = {d for spec in inputs for d in spec.shape if isinstance(d, str)}
    boxes = resolve_axes(axes, shapes, multiples, minimums, maximums)
    out = {}
    for spec in inputs:
        dims = [(d, d, d) if isinstance(d, int) else boxes[d] for d in spec.shape]
        out[spec.name] = tuple(tuple(int(d[i]) for d in dims) for i in range(3))
    return out  # type: ignore[return-value]


def check_shapes_apply(shapes: Mapping[str, Profile], segments: Iterable[Any],
                       multiples: Mapping[str, Sequence[Any]] | None = None) -> None:
    """Every ``--shapes`` axis must be an axis of some segment input (or the base of one: catches typos)."""
    axes = {d for seg in segments for s in seg.inputs for d in s.shape if isinstance(d, str)}
    known = set().union(*(_names(a) for a in axes)) if axes else set()
    known |= {str(v[0]) for k, v in (multiples or {}).items() if k in known}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise BadInputError(f"--shapes names axes {unknown} that no segment input has; the bundle's "
                            f"symbolic axes are {sorted(known)}", "use one of those names")
