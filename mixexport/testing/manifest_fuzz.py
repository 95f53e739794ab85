"""Manifest fuzzing: random structural mutations of a real ``manifest.json``, each run through what
reads a manifest (``verify``, ``inspect``, ``inspect --json``, ``Runtime.open``).

A manifest is untrusted input (bundles travel), so every mutation must end in either a clean
success or a clean refusal: exit 1/2/3 with one ``error:`` line (and its ``hint:``) — or, for
``verify``, its parity gate's ``FAIL`` lines with exit 1 — or a
:class:`~mixexport.errors.MixexportError` whose message is one line; never a traceback, an
internal error (exit 4) or a hang. Mutations (:data:`KINDS`):

``drop`` a key or list entry · ``extra`` key or entry · ``type`` (a value of another JSON type) ·
``huge`` numbers (2^63, 10^400, 1e999, 5000 digits) · ``negative`` numbers · ``unicode`` (lone
surrogates, NUL, bidi overrides, combining marks, 100k-character strings, in values and keys) ·
``deep`` nesting (up to 100 000 levels) · ``dup-segment`` (two segments with one name) · ``cycle``
(a segment reading its own output or a later segment's) · ``dup-key`` (a JSON key given twice) ·
``path`` (a manifest path leaving the bundle) · ``swap`` (two values exchanged) · ``truncate``.

Mutation sites are drawn from the whole manifest, weighted towards the parts a reader uses
(segments, model inputs/outputs, caches, files). ``scripts/fuzz_manifest.py`` is the long run;
``tests/test_trust.py`` runs a CI-sized slice.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

KINDS = ("drop", "extra", "type", "huge", "negative", "unicode", "deep", "dup-segment", "cycle", "dup-key",
         "path", "swap", "truncate")
CONSUMERS = ("verify", "inspect", "inspect-json", "Runtime.open")
STRUCTURAL = ("segments", "caches", "files", "schema_version", "target")
ODD_STRINGS = ("\ud800", "\udfff", "a\x00b", "\u202egnp.evil", "e\u0301\u0301\u0301", "\ufeffBOM", "\uffff",
               "line\nbreak", "\U0001F600", "x" * 100_000, "", " ", "\\", "..", "/", "ﬁle", "\u0130")
HUGE = ("9223372036854775808", "1" + "0" * 400, "1e999", "-1e999", "1" + "0" * 5000, "1.7976931348623157e308")
NEGATIVE = (-1, -2**31, -2**63, -0.5)
ESCAPES = ("../outside.onnx", "/etc/passwd", "segments/../../x", "segments\\model.onnx", "", ".", "segments/",
           "/", "a/../../b", "C:/x")

JsonPath = tuple  # a path in the JSON tree: keys and indices


class _Hang(BaseException):
    """Raised by the watchdog; a BaseException so the CLI's ``except Exception`` cannot swallow it."""


@dataclass
class Outcome:
    kind: str                 # refused | accepted | failed
    code: int | None = None
    detail: str = ""


@dataclass
class Mutation:
    index: int
    kind: str
    where: str
    text: str                 # the mutated manifest.json
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(o.kind == "failed" for o in self.outcomes.values())


# --------------------------------------------------------------------------------------------
# mutating

def _paths(node: Any, prefix: JsonPath = ()) -> Iterator[JsonPath]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node: Any, path: JsonPath) -> Any:
    for p in path:
        node = node[p]
    return node


def _show(path: JsonPath) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(root)"


def _other_type(value: Any, rng: random.Random) -> Any:
    pool = [None, True, 0, 1.5, "text", [], {}, [1, "a"], {"k": "v"}]
    return rng.choice([v for v in pool if type(v) is not type(value)])


def _random_value(rng: random.Random) -> Any:
    return rng.choice([None, False, 7, -3, 2.5, "extra", rng.choice(ODD_STRINGS), [], {}, {"nested": [1, 2]}])


def mutate(manifest: dict[str, Any], rng: random.Random) -> tuple[str, str, str]:
    """One random mutation of ``manifest``: (kind, where, the mutated JSON text)."""
    kind = rng.choice(KINDS)
    data = copy.deepcopy(manifest)
    paths = list(_paths(data))
    used = [p for p in paths if p and p[0] in STRUCTURAL or p[:2] in (("model", "inputs"), ("model", "outputs"))]
    path = rng.choice(used if used and rng.random() < 0.75 else paths)
    marker = None
    segments = data["segments"]
    if kind in ("drop", "extra", "type", "huge", "negative", "unicode", "deep", "swap") and not path:
        path = (rng.choice(list(data)),)
    parent, key = (_get(data, path[:-1]), path[-1]) if path else (None, None)
    where = _show(path)
    if kind == "drop":
        del parent[key]
    elif kind == "extra":
        target = _get(data, path)
        if isinstance(target, dict):
            target[rng.choice(["extra", "name", "file", "\ud800", "x" * 300, ""])] = _random_value(rng)
        elif isinstance(target, list):
            target.insert(rng.randrange(len(target) + 1), _random_value(rng))
        else:
            parent[key] = [target, _random_value(rng)]
    elif kind == "type":
        parent[key] = _other_type(parent[key], rng)
    elif kind in ("huge", "deep"):
        marker = f"__fuzz_{kind}__"
        parent[key] = marker
    elif kind == "negative":
        parent[key] = rng.choice(NEGATIVE)
    elif kind == "unicode":
        odd = rng.choice(ODD_STRINGS)
        if isinstance(parent, dict) and rng.random() < 0.3:
            parent[odd] = parent.pop(key)
            where += " (key)"
        else:
            parent[key] = odd if not isinstance(parent[key], str) or rng.random() < 0.5 else parent[key] + odd
    elif kind == "dup-segment":
        i = rng.randrange(len(segments))
        if len(segments) > 1 and rng.random() < 0.5:
            j = rng.choice([k for k in range(len(segments)) if k != i])
            segments[j]["name"] = segments[i]["name"]
            where = f"segments[{j}].name = segments[{i}].name"
        else:
            segments.append(copy.deepcopy(segments[i]))
            where = f"segments += copy of segments[{i}]"
    elif kind == "cycle":
        a, b = rng.randrange(len(segments)), rng.randrange(len(segments))
        out = copy.deepcopy(rng.choice(segments[b]["outputs"]))
        segments[a]["inputs"].append(out)
        where = f"segments[{a}] reads {out['name']!r} of segments[{b}]"
    elif kind == "dup-key":
        objects = [p for p in paths if isinstance(_get(data, p), dict) and _get(data, p)]
        obj_path = rng.choice(objects)
        dup = rng.choice(list(_get(data, obj_path)))
        where = f"{_show(obj_path)} key {dup!r} twice"
        marker = "__fuzz_dup__"
        _get(data, obj_path)[marker] = dup
    elif kind == "path":
        seg = rng.choice(segments)
        escape = rng.choice(ESCAPES)
        choice = rng.choice(["file", "engine", "data", "files-key"])
        if choice == "file":
            seg["file"] = escape
        elif choice == "engine":
            seg.setdefault("engines", {})[rng.choice(list(seg.get("engines") or {"aoti": 0}))] = escape
        elif choice == "data":
            seg["data_files"] = [escape]
        else:
            old = rng.choice(list(data["files"]))
            data["files"][escape] = data["files"].pop(old)
        where = f"segment {seg['name']} {choice} = {escape!r}"
    elif kind == "swap":
        siblings = [p for p in paths if len(p) == len(path) and p[:-1] == path[:-1] and p != path]
        if siblings:
            other = rng.choice(siblings)
            parent[key], parent[other[-1]] = parent[other[-1]], parent[key]
            where += f" <-> {_show(other)}"
        else:
            parent[key] = _other_type(parent[key], rng)
    text = json.dumps(data, indent=1)
    if kind == "truncate":
        text = text[:rng.randrange(len(text))]
        where = f"first {len(text)} characters"
    elif marker == "__fuzz_huge__":
        text = text.replace(json.dumps(marker), rng.choice(HUGE), 1)
    elif marker == "__fuzz_deep__":
        depth = rng.choice((64, 1000, 5000, 100_000))
        open_, close = ("[", "]") if rng.random() < 0.5 else ('{"a":', "}")
        text = text.replace(json.dumps(marker), open_ * depth + "1" + close * depth, 1)
        where += f" (depth {depth})"
    elif marker == "__fuzz_dup__":
        dup = _get(data, obj_path)[marker]
        value = json.dumps(_get(data, obj_path)[dup])
        text = text.replace(f'{json.dumps(marker)}: {json.dumps(dup)}', f"{json.dumps(dup)}: {value}", 1)
    return kind, where, text


# --------------------------------------------------------------------------------------------
# running

@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise _Hang()

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _cli(args: list[str], timeout_s: float) -> Outcome:
    from mixexport.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with _watchdog(timeout_s), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(args)
            except SystemExit as e:
                code = int(e.code or 0)
    except _Hang:
        return Outcome("failed", None, f"no answer within {timeout_s:g} s")
    lines = err.getvalue().splitlines()
    errors = [k for k, line in enumerate(lines) if line.startswith("error: ")]
    if code == 0:
        return Outcome("accepted", 0)
    if code == 4 or "Traceback" in err.getvalue():
        return Outcome("failed", code, err.getvalue()[-2000:])
    gate = [line for line in lines if line.startswith("FAIL ")]
    if code == 1 and not errors and gate:  # verify's parity gate: every failing output, one line each
        return Outcome("refused", code, f"parity gate: {gate[0][5:][:250]} ({len(gate)} FAIL lines)")
    if len(errors) != 1 or (errors[0] + 1 < len(lines) and not lines[errors[0] + 1].startswith("hint: ")):
        return Outcome("failed", code, "not one error line: " + err.getvalue()[-1000:])
    return Outcome("refused", code, lines[errors[0]][7:][:300])


def _open(bundle: Path, timeout_s: float) -> Outcome:
    from mixexport.errors import MixexportError
    from mixexport.runtime import Runtime

    try:
        with _watchdog(timeout_s):
            try:
                Runtime.open(bundle).close()
            except MixexportError as e:
                if "\n" in e.message:
                    return Outcome("failed", e.exit_code, "multi-line message: " + e.message[:500])
                return Outcome("refused", e.exit_code, e.message[:300])
            except Exception as e:  # noqa: BLE001 - anything else is the bug this fuzzer looks for
                return Outcome("failed", None, f"{type(e).__name__}: {str(e)[:500]}")
    except _Hang:
        return Outcome("failed", None, f"no answer within {timeout_s:g} s")
    return Outcome("accepted", 0)


def run(bundle: Path, mutations: int, seed: int = 0, timeout_s: float = 120.0, start: int = 0,
        verify_accepted: int | None = None, progress: Callable[[Mutation], None] | None = None) -> list[Mutation]:
    """Mutate ``bundle``'s manifest ``mutations`` times (mutation k from ``seed`` and k, so each one
    replays alone with ``start=k, mutations=1``) and run every consumer on each; the manifest is
    restored afterwards. ``verify_accepted``: run ``verify`` in full on at most this many mutations
    the other consumers accepted (a full verify runs parity; None: on all of them)."""
    path = Path(bundle) / "manifest.json"
    original = path.read_bytes()
    manifest = json.loads(original)
    done: list[Mutation] = []
    full_verifies = 0
    try:
        for k in range(start, start + mutations):
            kind, where, text = mutate(manifest, random.Random(f"{seed}/{k}"))
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
            m = Mutation(k, kind, where, text)
            m.outcomes["Runtime.open"] = _open(Path(bundle), timeout_s)
            m.outcomes["inspect"] = _cli(["inspect", str(bundle)], timeout_s)
            m.outcomes["inspect-json"] = _cli(["inspect", "--json", str(bundle)], timeout_s)
            accepted = all(o.kind == "accepted" for o in m.outcomes.values())
            if not accepted or verify_accepted is None or full_verifies < verify_accepted:
                full_verifies += accepted
                m.outcomes["verify"] = _cli(["verify", "--no-metrics", str(bundle)], timeout_s)
            done.append(m)
            if progress:
                progress(m)
    finally:
        path.write_bytes(original)
    return done


def summarize(results: list[Mutation], seconds: float | None = None) -> dict[str, Any]:
    """Counts per consumer and outcome, per mutation kind, and every failure in full."""
    per_consumer = {c: {"refused": 0, "accepted": 0, "failed": 0, "skipped": 0} for c in CONSUMERS}
    per_kind: dict[str, dict[str, int]] = {}
    for m in results:
        for c in CONSUMERS:
            o = m.outcomes.get(c)
            per_consumer[c][o.kind if o else "skipped"] += 1
        k = per_kind.setdefault(m.kind, {"mutations": 0, "refused_by_all": 0})
        k["mutations"] += 1
        k["refused_by_all"] += all(o.kind == "refused" for o in m.outcomes.values())
    return {"mutations": len(results), "seconds": seconds, "consumers": per_consumer, "kinds": per_kind,
            "failures": [{"index": m.index, "kind": m.kind, "where": m.where,
                          "outcomes": {c: vars(o) for c, o in m.outcomes.items() if o.kind == "failed"}}
                         for m in results if m.failed],
            "accepted_examples": [{"index": m.index, "kind": m.kind, "where": m.where} for m in results
                                  if all(o.kind == "accepted" for o in m.outcomes.values())][:20]}


def timed_run(bundle: Path, mutations: int, seed: int = 0, **kw: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = run(bundle, mutations, seed, **kw)
    return summarize(results, round(time.perf_counter() - t0, 1))
