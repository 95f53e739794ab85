"""The value checks a manifest is read through (:mod:`mixexport.manifest_check` applies them to every
entry): objects, lists, names, identifiers, bounded integers, numbers, choices and tensor specs, each
failing with one line that names the entry and says what was expected."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mixexport.errors import BadInputError
from mixexport.names import NAME_RULE, name_problem

HINT = "rebuild the bundle, or fetch it again from where it was published"
TENSOR_ROLES = ("user", "item", "sequence", "state", "cache", "index", "output")
MAX_DIM = 2**31 - 1
MAX_ITEMS = 4096            # list lengths (specs per segment, files, passes)
DTYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class Check:
    """The checks of one manifest: each returns the value it checked, or raises one line naming the
    entry (``segments[1].inputs[3]``) and what it should be."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> BadInputError:
        return BadInputError(f"{self.path}: {where} {problem}", HINT)

    def obj(self, v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(where, f"must be an object, found {kind(v)}")
        return v

    def array(self, v: Any, where: str, lo: int = 0) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(where, f"must be a list, found {kind(v)}")
        if not lo <= len(v) <= MAX_ITEMS:
            raise self.fail(where, f"must hold {lo} to {MAX_ITEMS} entries, found {len(v)}")
        return v

    def key(self, d: dict[str, Any], key: str, where: str) -> Any:
        if key not in d:
            raise self.fail(where, f"is missing {key!r}")
        return d[key]

    def name(self, v: Any, where: str, longest: int = 256) -> str:
        if not isinstance(v, str):
            raise self.fail(where, f"must be a string, found {kind(v)}")
        if not 0 < len(v) <= longest or not v.isprintable() or not _utf8(v):
            raise self.fail(where, f"must be 1 to {longest} printable characters, found {short(v)}")
        return v

    def ident(self, v: Any, where: str) -> str:
        """A name that may become a file, directory or config entry (a segment, tensor or cache):
        the one name rule of :mod:`mixexport.names`."""
        problem = name_problem(self.name(v, where))
        if problem is not None:
            raise self.fail(where, f"is {short(v)}, which breaks the name rule ({NAME_RULE}): {problem}")
        return v

    def integer(self, v: Any, where: str, lo: int = 0, hi: int = MAX_DIM) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(where, f"must be an integer, found {kind(v)}")
        if not lo <= v <= hi:
            raise self.fail(where, f"must be in [{lo}, {hi}], found {short(v)}")
        return v

    def number(self, v: Any, where: str) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise self.fail(where, f"must be a finite number >= 0, found {short(v)}")
        return float(v)

    def choice(self, v: Any, where: str, allowed: tuple[str, ...]) -> str:
        if v not in allowed:
            raise self.fail(where, f"is {short(v)}, expected one of {', '.join(allowed)}")
        return v

    def spec(self, v: Any, where: str) -> dict[str, Any]:
        d = self.obj(v, where)
        self.ident(self.key(d, "name", where), f"{where}.name")
        dtype = self.key(d, "dtype", where)
        if not isinstance(dtype, str) or not DTYPE.fullmatch(dtype):
            raise self.fail(f"{where}.dtype", f"must be a dtype name (float32, int64, ...), found {short(dtype)}")
        shape = self.array(self.key(d, "shape", where), f"{where}.shape")
        if len(shape) > 16:
            raise self.fail(f"{where}.shape", f"has {len(shape)} axes, more than 16")
        for k, dim in enumerate(shape):
            if isinstance(dim, str):
                self.name(dim, f"{where}.shape[{k}]", longest=64)
            else:
                self.integer(dim, f"{where}.shape[{k}]")
        self.choice(self.key(d, "role", where), f"{where}.role", TENSOR_ROLES)
        vocab = d.get("vocab")
        if isinstance(vocab, list):
            self.array(vocab, f"{where}.vocab", lo=1)
            for k, n in enumerate(vocab):
                self.integer(n, f"{where}.vocab[{k}]", lo=1, hi=2**62)
            if shape and isinstance(shape[-1], int) and len(vocab) != shape[-1]:
                raise self.fail(f"{where}.vocab", f"has {len(vocab)} entries for a last axis of {shape[-1]}")
        elif vocab is not None:
            self.integer(vocab, f"{where}.vocab", lo=1, hi=2**62)
        ids = d.get("ids")
        if ids is not None:  # id ranges found in the graph (mixexport/program/ids.py)
            self.array(ids, f"{where}.ids", lo=1)
            for k, r in enumerate(ids):
                if r is None:
                    continue
                if not isinstance(r, dict):
                    raise self.fail(f"{where}.ids[{k}]", f"must be an object or null, found {kind(r)}")
                low = self.integer(self.key(r, "low", f"{where}.ids[{k}]"), f"{where}.ids[{k}].low", lo=0, hi=2**62)
                if r.get("high") is not None:
                    self.integer(r["high"], f"{where}.ids[{k}].high", lo=low + 1, hi=2**63 - 1)
            if len(ids) > 1 and shape and isinstance(shape[-1], int) and len(ids) != shape[-1]:
                raise self.fail(f"{where}.ids", f"has {len(ids)} entries for a last axis of {shape[-1]}")
        return d

    def specs(self, v: Any, where: str, lo: int = 0) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for k, s in enumerate(self.array(v, where, lo)):
            s = self.spec(s, f"{where}[{k}]")
            if s["name"] in out:
                raise self.fail(where, f"names {s['name']!r} twice")
            out[s["name"]] = s
        return out


def _utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:72] + "…" + text[-6:]
