"""A Triton Inference Server model repository for a bundle (``mixexport triton BUNDLE --out REPO``).

Two flavours, both derived from the manifest (the single source of truth; nothing is re-exported):

- ``python`` (default): one model, ``backend: "python"``, that serves the bundle through
  :class:`mixexport.runtime.Runtime` (``model.py`` = :mod:`mixexport.serving.triton_model`). The
  bundle is copied, file by file checked against its sha256, into the model's version directory and
  the manifest's own sha256 is pinned in the config, so the server opens exactly what was verified.
  Requests carry the user inputs (U rows), the item inputs (N rows), ``user_index [N]`` and an
  optional ``user_id [U]`` (strings): with ids, user state and KV caches are kept per user across
  requests (bounded LRU, per model instance), and a sequence that grew by new behaviours only
  encodes the new positions. This is the flavour a split or KV bundle needs: a plain ensemble
  recomputes the user segment on every request.
- ``native``: one model per segment on Triton's own backends (``onnxruntime_onnx``, or
  ``tensorrt_plan`` for segments with a TensorRT engine) plus an ``ensemble`` under the bundle's name
  that runs the cache/user segments once per request and the item segment over the request's
  candidates with ``user_index``. An unsplit bundle becomes one model with dynamic batching on its
  batch axis. Split segments keep ``max_batch_size: 0``: their requests cannot be concatenated by
  Triton's batcher (``user_index`` counts a request's own users; merged requests would point at the
  wrong rows), so each request is one U × N call.

Config files are Triton's protobuf text format (``model_config.proto``), written by a serializer
(:func:`_text`: every string escaped by protobuf's ``CEscape``, never pasted); the tests parse every
one with ``tritonclient``'s own ``model_config_pb2``, so a field Triton does not know fails them.
Every manifest name that reaches a path or a config obeys the name rule (:mod:`mixexport.names`),
every path built is resolved inside the repository (:func:`_child`), and ``--out``/``--force``
follow :mod:`mixexport.outdir` (never the bundle; replace only a repository mixexport wrote).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
from google.protobuf.text_encoding import CEscape

from mixexport.bundle import Manifest, SegmentEntry, read_manifest
from mixexport.errors import BadInputError, IntegrityError
from mixexport.names import NAME_RULE, name_problem
from mixexport.outdir import check_out, is_write_error, write_error, write_marker
from mixexport.runtime import DEFAULT_CACHE_BYTES
from mixexport.specs import TensorSpec
from mixexport.trust import external_data_files

FLAVOURS = ("python", "native")
MODEL_FILE = Path(__file__).with_name("triton_model.py")
USER_ID = "user_id"          # the python flavour's request field naming the U users (strings)
#: that field's name when the model itself has an input called ``user_id`` (a user's own program with
#: ``forward(self, user_id, item_id)``): two inputs of one name make Triton refuse the config
USER_ID_FALLBACK = "mixexport_user_id"
USER_INDEX = "user_index"
MAX_MODEL_NAME = 64          # the served name; a segment's model is <name>_<segment> (<= 64 + 1 + 128)

# numpy dtype name -> Triton data type (model_config.proto DataType)
DATA_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int16": "TYPE_INT16",
              "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32",
              "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16"}


@dataclass(frozen=True)
class TritonOptions:
    out: Path
    flavour: str = "python"
    name: str | None = None          # the served model's name (default: the bundle directory's)
    instances: int = 1               # python flavour: model instances (processes), each with its own caches
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_batch_size: int = 4096       # native flavour, unsplit bundles: the dynamic batcher's limit
    force: bool = False
    tables: str | None = None        # python flavour: the table store (redis://…); None: the bundle's files


def write_repository(bundle: str | Path, options: TritonOptions, manifest_sha256: str | None = None) -> dict[str, Any]:
    """Write a Triton model repository for ``bundle`` at ``options.out`` (a temporary sibling renamed
    when complete; an existing one is replaced only with ``force``, and only if mixexport wrote it
    or it is empty). ``--out`` may not be, contain or lie inside the bundle. Returns a summary: the
    models written (name, kind, files) and notes on what the flavour does not carry over.

    Every name in the repository (directories, config entries) is a manifest name checked against
    the name rule (:mod:`mixexport.names`) and every config is written by a serializer that quotes
    each string (:func:`_text`): nothing from the manifest is pasted into a file or a path."""
    if options.flavour not in FLAVOURS:
        raise BadInputError(f"unknown flavour {options.flavour!r}", f"one of {', '.join(FLAVOURS)}")
    if options.instances < 1 or options.cache_bytes < 0 or options.max_batch_size < 1:
        raise BadInputError("--instances and --max-batch-size must be >= 1, --cache-bytes >= 0",
                            f"found {options.instances}, {options.max_batch_size}, {options.cache_bytes}")
    manifest = read_manifest(bundle, sha256=manifest_sha256)
    name = options.name or re.sub(r"[^A-Za-z0-9_.-]", "_", manifest.root.resolve().name).lstrip(".-")[:MAX_MODEL_NAME]
    problem = name_problem(name) or (f"it has {len(name)} characters" if len(name) > MAX_MODEL_NAME else None)
    if problem:
        raise BadInputError(f"model name {name!r} is not a valid Triton model name: {problem}",
                            f"pass --name with {NAME_RULE.replace('128', str(MAX_MODEL_NAME))}")
    _check_names(manifest)
    if options.flavour != "python" and manifest.data.get("tables"):  # the ensemble has no table store
        raise BadInputError(f"{manifest.root} keeps {len(manifest.data['tables'])} embedding tables outside its "
                            "segments (externalize-embeddings); the native flavour cannot look rows up",
                            "use --flavour python, whose model runs the bundle with its local table store")
    if options.flavour != "python" and options.tables:
        raise BadInputError(f"--tables applies to the python flavour only, found --flavour {options.flavour}",
                            "use --flavour python")
    out = Path(options.out)
    check_out(out, options.force, {"bundle": manifest.root}, kind="triton-repository")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or full file system above --out
        raise write_error(e, out) from None
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        if options.flavour == "python":
            models, notes = _python_flavour(manifest, name, options, tmp)
        else:
            models, notes = _native_flavour(manifest, name, options, tmp)
        write_marker(tmp, "triton-repository")  # a file at the repository root: Triton loads directories only
        if out.exists():
            # again: it may have been replaced or filled while the repository was written
            check_out(out, True, {"bundle": manifest.root}, kind="triton-repository")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "repo")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_write_error(e, out):  # a full disk, a read-only --out: one line, nothing left behind
            raise write_error(e, out) from e  # type: ignore[arg-type]
        raise
    return {"repository": str(out), "flavour": options.flavour, "model": name, "bundle": str(manifest.root),
            "manifest_sha256": manifest.sha256, "models": models, "notes": notes}


def _check_names(manifest: Manifest) -> None:
    """The name rule on every name the repository uses (``read_manifest`` checked them already; a
    :class:`Manifest` built another way is checked here too, before any name reaches a path)."""
    for seg in manifest.segments:
        for what, value in [("segment", seg.name), *(("tensor", s.name) for s in (*seg.inputs, *seg.outputs))]:
            problem = name_problem(value)
            if problem:
                raise BadInputError(f"{manifest.root}: {what} name {value!r} breaks the name rule ({NAME_RULE}): "
                                    f"{problem}", "rebuild the bundle, or fetch it again from where it was published")
    for s in (*manifest.inputs, *manifest.outputs):
        if name_problem(s.name):
            raise BadInputError(f"{manifest.root}: tensor name {s.name!r} breaks the name rule ({NAME_RULE}): "
                                f"{name_problem(s.name)}", "rebuild the bundle")


def user_id_input(manifest: Manifest) -> str:
    """The python flavour's optional cache-key input: ``user_id``, or :data:`USER_ID_FALLBACK` when
    the model has an input of that name (the model's own ``user_id`` ids keep their name)."""
    names = {s.name for s in manifest.inputs}
    if USER_INDEX in names or USER_ID_FALLBACK in names:
        raise BadInputError(f"{manifest.root}: the model has an input named {USER_INDEX!r} or {USER_ID_FALLBACK!r}, "
                            "which the python flavour's requests use", "rename that input, or use --flavour native")
    return USER_ID_FALLBACK if USER_ID in names else USER_ID


def _child(root: Path, *parts: str) -> Path:
    """``root/parts…``, refused unless it stays inside ``root`` (names are checked; this is the
    second line: a path the repository builds never leaves it)."""
    path = root.joinpath(*parts)
    base = root.resolve()
    if base not in path.resolve().parents:
        raise IntegrityError(f"refusing to write {'/'.join(parts)!r}: it resolves outside {root}",
                             "the bundle's names or paths are not what mixexport writes; rebuild it")
    return path


# -- python flavour -------------------------------------------------------------------------------
def _python_flavour(manifest: Manifest, name: str, options: TritonOptions,
                    repo: Path) -> tuple[list[dict[str, Any]], list[str]]:
    version = _child(repo, name, "1")
    rels = ["manifest.json", *sorted(manifest.data["files"])]
    if options.tables and options.tables != "local":  # tables served from the store: no part files copied
        from mixexport.tables.redis.url import parse_url

        parse_url(options.tables)  # a bad URL: exit 2 now, not when the server starts
        parts = {f for t in manifest.data.get("tables") or [] for p in t["parts"] for f in (p["file"], p["ids"],
                                                                                           p.get("scale")) if f}
        rels = [r for r in rels if r not in parts]
    manifest.check_files([r for r in rels if r != "manifest.json"])  # copy only what matches its sha256
    for rel in rels:
        dst = _child(version, "bundle", *Path(rel).parts)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest.file(rel), dst)
    # model.py is this package's file, copied as is: it reads every name from the bundle's manifest
    # at run time, so no manifest name is ever written into code
    shutil.copyfile(MODEL_FILE, version / "model.py")
    inputs = [_tensor(s.name, s.dtype, s.shape) for s in manifest.inputs]
    inputs.append(_tensor(USER_INDEX, "int64", ("candidates",)))
    key = user_id_input(manifest)
    inputs.append(_tensor(key, None, ("users",), optional=True))
    text = _config(
        name, [("backend", "python"), ("max_batch_size", 0)], inputs,
        [_tensor(s.name, s.dtype, s.shape) for s in manifest.outputs],
        header=[f"mixexport {manifest.data['model'].get('family') or 'program'} bundle served through "
                "mixexport.runtime.Runtime (1/model.py, 1/bundle/)",
                f"user inputs: U rows; item inputs and user_index: N rows; {key} (optional, U strings) "
                "keys the per-user caches"],
        tail=[("instance_group", [("kind", Enum("KIND_CPU")), ("count", options.instances)]),
              _parameter("manifest_sha256", manifest.sha256),
              _parameter("cache_bytes", str(options.cache_bytes)),
              _parameter("user_id_input", key),
              *([_parameter("tables", options.tables)] if options.tables else [])])
    _child(repo, name, "config.pbtxt").write_text(text)
    files = sorted(str(p.relative_to(repo)) for p in (repo / name).rglob("*") if p.is_file())
    notes = ["the server's Python must import mixexport, numpy and onnxruntime: start tritonserver with that "
             "environment's bin directory first on PATH (the python-backend stub takes its interpreter from it)"]
    if options.instances > 1:
        notes.append(f"{options.instances} instances: each keeps its own per-user caches")
    return [{"name": name, "kind": "python", "files": files}], notes


# -- native flavour -------------------------------------------------------------------------------
def _native_flavour(manifest: Manifest, name: str, options: TritonOptions,
                    repo: Path) -> tuple[list[dict[str, Any]], list[str]]:
    notes: list[str] = []
    ids = [s.name for s in manifest.inputs if s.id_ranges()]
    if ids:  # the backends run the segments directly: nothing refuses an id outside its range (docs/ids.md)
        notes.append(f"id inputs {ids} are not range-checked by the native flavour (a Gather wraps -1 to the "
                     "last row): check ids in front of Triton, or serve with --flavour python, which refuses them")
    segments = manifest.segments
    models = []
    if len(segments) == 1 and segments[0].role == "full":
        seg = segments[0]
        # flat rows: every input and output leads with the batch axis, which Triton's batcher may concatenate
        batched = all(s.shape and s.shape[0] == "batch" for s in (*seg.inputs, *seg.outputs))
        models.append(_segment_model(manifest, seg, name, repo, notes, options.max_batch_size if batched else 0))
        notes.append("one model on flat rows (the user inputs repeated per candidate, no user_index)"
                     + (", dynamic batching on the batch axis" if batched else ""))
        return models, notes
    produced = {s.name for seg in segments for s in seg.outputs}
    for seg in segments:
        models.append(_segment_model(manifest, seg, f"{name}_{seg.name}", repo, notes, 0))
    # the ensemble's inputs: every segment input no segment produces, in first-use order
    ext: dict[str, TensorSpec] = {}
    for seg in segments:
        for s in seg.inputs:
            if s.name not in produced:
                ext.setdefault(s.name, s)
    steps: list[Field] = []
    for seg in segments:
        step: list[Field] = [("model_name", f"{name}_{seg.name}"), ("model_version", -1)]
        step += [("input_map", [("key", s.name), ("value", s.name)]) for s in seg.inputs]
        step += [("output_map", [("key", s.name), ("value", s.name)]) for s in seg.outputs]
        steps.append(("step", step))
    item = next(s for s in segments if s.role == "item")
    text = _config(
        name, [("platform", "ensemble"), ("max_batch_size", 0)],
        [_tensor(s.name, s.dtype, s.shape) for s in ext.values()],
        [_tensor(s.name, s.dtype, s.shape) for s in item.outputs],
        header=[f"{' -> '.join(s.name for s in segments)}: the user-side segments once per request (U users), "
                "the item segment over the N candidates with user_index",
                "no per-user caches across requests here: that needs the python flavour (mixexport triton "
                "--flavour python)"],
        tail=[("ensemble_scheduling", steps)])
    _child(repo, name, "1").mkdir(parents=True)  # an ensemble still needs a version directory
    _child(repo, name, "config.pbtxt").write_text(text)
    models.append({"name": name, "kind": "ensemble", "files": [f"{name}/config.pbtxt"]})
    notes.append("split segments run with max_batch_size 0 (no dynamic batching): user_index counts a "
                 "request's own users, so Triton cannot concatenate requests")
    if manifest.data.get("caches"):
        notes.append("the KV cache is recomputed on every request (the ensemble keeps no state): serve the "
                     "python flavour to keep it per user across requests")
    return models, notes


def _segment_model(manifest: Manifest, seg: SegmentEntry, model: str, repo: Path, notes: list[str],
                   max_batch: int) -> dict[str, Any]:
    version = _child(repo, model, "1")
    version.mkdir(parents=True)
    plan = seg.engines.get("tensorrt")
    if plan:  # TensorRT proper: Triton's tensorrt backend deserializes the plan
        manifest.check_files([plan])
        shutil.copyfile(manifest.file(plan), version / "model.plan")
        kind, platform = "tensorrt_plan", "tensorrt_plan"
    else:
        rels = [seg.file, *external_data_files(manifest.root, seg.file)]
        manifest.check_files(rels)
        shutil.copyfile(manifest.file(seg.file), version / "model.onnx")
        for rel in rels[1:]:  # external data: its location is relative to the ONNX file
            try:
                dst = _child(version, *Path(rel).relative_to(Path(seg.file).parent).parts)
            except ValueError:
                raise IntegrityError(f"segment {seg.name}: external data {rel!r} is not beside or below its ONNX "
                                     f"file {seg.file!r}", "rebuild the bundle") from None
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(manifest.file(rel), dst)
        kind, platform = "onnxruntime_onnx", "onnxruntime_onnx"
        other = sorted(set(seg.engines) - {"tensorrt"})
        if other:
            notes.append(f"segment {seg.name}: its {', '.join(other)} engine is not servable by a Triton backend "
                         "here; the model serves its ONNX file with ONNX Runtime")
        opts = seg.session_options.get("config") or {}
        note = (f"Triton's onnxruntime backend does not take the manifest's ONNX Runtime session config entries "
                f"({', '.join(sorted(opts))}); the bundle's parity was verified with them")
        if opts and note not in notes:
            notes.append(note)
    batched = max_batch > 0
    ins = [_tensor(s.name, s.dtype, s.shape[1:] if batched else s.shape) for s in seg.inputs]
    outs = [_tensor(s.name, s.dtype, s.shape[1:] if batched else s.shape) for s in seg.outputs]
    tail: list[Field] = [("dynamic_batching", [])] if batched else []
    text = _config(model, [("platform", platform), ("max_batch_size", max_batch)], ins, outs,
                   header=[f"segment {seg.name} ({seg.role}) of the mixexport bundle"], tail=tail)
    _child(repo, model, "config.pbtxt").write_text(text)
    files = sorted(str(p.relative_to(repo)) for p in (repo / model).rglob("*") if p.is_file())
    return {"name": model, "kind": kind, "segment": seg.name, "files": files}


# -- protobuf text format -------------------------------------------------------------------------
class Enum(str):
    """An enum value of ``model_config.proto`` (written bare, so checked to be an identifier)."""


#: a config is a list of fields; a value is a string (always quoted and escaped), an integer or
#: boolean, an :class:`Enum`, a tuple of integers (a repeated scalar) or a list of fields (a message)
Field = tuple[str, Union[str, int, bool, Enum, tuple, list]]
_FIELD = re.compile(r"[a-z][a-z0-9_]*")
_ENUM = re.compile(r"[A-Z][A-Z0-9_]*")


def _text(fields: Sequence[Field], indent: int = 0) -> str:
    """Protobuf text format for ``fields``: every string through ``CEscape`` (the text format's own
    escaping), so a quote, backslash or newline in a value stays inside that value."""
    pad = "  " * indent
    lines = []
    for key, value in fields:
        if not _FIELD.fullmatch(key):
            raise ValueError(f"not a field name: {key!r}")
        if isinstance(value, list):
            body = _text(value, indent + 1)
            lines.append(f"{pad}{key} {{\n{body}{pad}}}\n" if body else f"{pad}{key} {{\n{pad}}}\n")
        elif isinstance(value, tuple):
            lines.append(f"{pad}{key}: [ {', '.join(str(_int(v)) for v in value)} ]\n")
        elif isinstance(value, Enum):
            if not _ENUM.fullmatch(value):
                raise ValueError(f"not an enum value: {value!r}")
            lines.append(f"{pad}{key}: {value}\n")
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}\n")
        elif isinstance(value, int):
            lines.append(f"{pad}{key}: {value}\n")
        elif isinstance(value, str):
            lines.append(f'{pad}{key}: "{CEscape(value.encode("utf-8"), False)}"\n')
        else:
            raise TypeError(f"field {key}: cannot write a {type(value).__name__}")
    return "".join(lines)


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"not an integer: {v!r}")
    return v


def _comment(line: str) -> str:
    # a comment runs to the end of its line: only printable ASCII, so no newline can end it early
    return "# " + "".join(ch if " " <= ch <= "~" else "?" for ch in line)


def _tensor(name: str, dtype: str | None, shape: Sequence[int | str], optional: bool = False) -> list[Field]:
    if dtype is not None and dtype not in DATA_TYPES:
        raise BadInputError(f"tensor {name!r} has dtype {dtype}, which Triton has no data type for",
                            f"Triton takes {', '.join(sorted(DATA_TYPES))}")
    fields: list[Field] = [("name", name), ("data_type", Enum(DATA_TYPES[dtype] if dtype else "TYPE_STRING")),
                           ("dims", tuple(d if isinstance(d, int) else -1 for d in shape))]
    if optional:
        fields.append(("optional", True))
    return fields


def _parameter(key: str, value: str) -> Field:
    return ("parameters", [("key", key), ("value", [("string_value", value)])])


def _config(name: str, head: Iterable[Field], inputs: list[list[Field]], outputs: list[list[Field]],
            header: Iterable[str] = (), tail: Iterable[Field] = ()) -> str:
    fields: list[Field] = [("name", name), *head, *(("input", t) for t in inputs), *(("output", t) for t in outputs),
                           *tail]
    return "".join(_comment(line) + "\n" for line in header) + _text(fields)


def infer_inputs(client: Any, feeds: Mapping[str, np.ndarray]) -> list[Any]:
    """``tritonclient`` inputs for ``feeds`` (``client``: the ``tritonclient.http`` or ``.grpc``
    module); object arrays (the ``user_id`` strings) travel as ``BYTES``."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in feeds.items():
        t = client.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs
