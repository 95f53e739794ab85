"""The bundle as a trust boundary: nothing outside it is read, nothing unverified is loaded.

Bundles travel (training cluster → model registry → serving hosts), and some of what they hold is
native code the runtime executes (AOTInductor packages, TensorRT plans). Two rules, each applied
in one place:

- **Paths** (:func:`resolve_inside`). Every path the manifest names — segment files, their
  external-data files, engines, reports, inputs, every key of ``files`` — and every external-data
  ``location`` inside every ONNX file is relative, ``/``-separated, without a ``..`` component,
  not absolute, and resolves (symbolic links followed) inside the bundle directory.
  :meth:`mixexport.bundle.Manifest.file` calls it, so every backend's ``prepare`` does too;
  ``read_manifest`` applies it to every path before anything else reads the bundle.
- **Content** (:func:`check_files`, and for loading :func:`mixexport.checked_load.read_checked`). A
  file is loaded only after its sha256 matched the manifest's ``files`` entry; a file without an
  entry is refused as unverified. ``verify`` checks every file; ``Runtime.open`` checks the files
  it is about to load (unless ``verify_files=False``).

Every refusal is an :class:`~mixexport.errors.IntegrityError` (exit 1) naming the path and the rule.

The content check pins files to the manifest, so it protects against tampering only as far as the
manifest itself is trusted: pin the manifest's own sha256 (``read_manifest(..., sha256=)``,
``Runtime.open(..., manifest_sha256=)``, ``mixexport verify --manifest-sha256``). What
``Runtime.open`` loads is the very bytes it hashed, read once (:mod:`mixexport.checked_load`), so a
file swapped after its check is not loaded; docs/security.md lists the readers where that does not
hold. The same bytes are held to two content rules here: op domains (:func:`check_domains`) and ONNX
Runtime's reserved in-memory location (:func:`location_problem`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from mixexport.errors import BadInputError, IntegrityError

PATH_RULE = "relative, no '..', resolving inside the bundle"
PATH_HINT = ("a bundle is a trust boundary: nothing outside it is read; rebuild the bundle, or fetch it "
             "again from where it was published")
CONTENT_HINT = "the bundle was modified after it was built; rebuild it, or fetch it again from where it was published"
MAX_PATH = 1024
#: ONNX Runtime's name for "this external tensor is at the memory address in its offset"
ORT_MEMORY_LOCATION = "*/_ORT_MEM_ADDR_/*"
ORT_MEMORY_TAG = "_ORT_MEM_ADDR_"
#: the op domains a segment's nodes may use: standard ONNX (``""``, ``ai.onnx``, ``ai.onnx.ml``) and
#: ONNX Runtime's contrib ops (``com.microsoft``, which the int8 passes emit: MatMulIntegerToFloat).
#: Anything else is a custom op, whose kernel would come from a library the bundle cannot ship.
ALLOWED_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "…" + text[-8:]


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads(..., object_pairs_hook=no_duplicate_keys)``: a key given twice means different
    things to different JSON readers (Python keeps the last), so an untrusted document (a manifest,
    a .pt2's JSON members) must mean one thing to every reader of it: refuse it (``ValueError``)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_shown(key)}")
        out[key] = value
    return out


def path_problem(rel: object) -> str | None:
    """Why ``rel`` breaks the path rule on its own (without the file system), or None."""
    if not isinstance(rel, str):
        return f"it is a {type(rel).__name__}, not a path string"
    if not rel:
        return "it is empty"
    if len(rel) > MAX_PATH:
        return f"it is longer than {MAX_PATH} characters"
    if not rel.isprintable():
        return "it holds control or unprintable characters"
    try:
        os.fsencode(rel)
    except UnicodeError:
        return "it is not valid UTF-8"
    if "\\" in rel:
        return "it uses '\\' (bundle paths are '/'-separated)"
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return "it is absolute"
    if ".." in rel.split("/"):
        return "it climbs out with '..'"
    return None


def resolve_inside(root: str | Path, rel: object, where: str) -> Path:
    """``root / rel`` after checking the path rule; raises :class:`IntegrityError` otherwise.

    ``where`` says which manifest entry named the path (``segments[0].file``). The returned path is
    not resolved (links stay links, so libraries see the layout the bundle was written with), but
    it was proven to resolve inside ``root``.
    """
    root = Path(root)
    reason = path_problem(rel)
    if reason is None:
        rel = str(rel)
        base = os.path.realpath(root)
        real = os.path.realpath(root / rel)
        if real == base:
            reason = "it names the bundle directory itself"
        elif os.path.commonpath([base, real]) != base:
            link = any(os.path.islink(root.joinpath(*Path(rel).parts[:k + 1])) for k in range(len(Path(rel).parts)))
            reason = f"it resolves to {real}, outside the bundle" + (" (through a symbolic link)" if link else "")
        elif rel.endswith("/") or os.path.isdir(real):
            reason = "it names a directory, not a file"
    if reason is not None:
        raise IntegrityError(f"{where} {_shown(rel)} breaks the bundle path rule ({PATH_RULE}): {reason}", PATH_HINT)
    return root / str(rel)


def file_digest(path: Path) -> str:
    """sha256 of ``path`` (read through a memory map: no copy of large segment files)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return hashlib.sha256(mm).hexdigest()


def check_files(root: Path, files: Mapping[str, str], rels: Iterable[str], why: str = "load") -> None:
    """Raise :class:`IntegrityError` naming the first of ``rels`` (bundle-relative paths) that is
    missing, has no sha256 in the manifest's ``files``, or does not match it."""
    for rel in rels:
        path = resolve_inside(root, rel, "file")
        digest = files.get(rel)
        if digest is None:
            raise IntegrityError(f"{rel} has no sha256 in the manifest's files; refusing to {why} an unverified file",
                                 CONTENT_HINT)
        if not path.is_file():
            raise IntegrityError(f"{rel} is missing from the bundle (or is not a regular file); refusing to {why} it",
                                 CONTENT_HINT)
        if file_digest(path) != digest:
            raise IntegrityError(f"{rel} does not match its sha256 in the manifest (changed after the build); "
                                 f"refusing to {why} it", CONTENT_HINT)


# --------------------------------------------------------------------------------------------
# ONNX external data

def external_data_files(root: Path, rel: str) -> list[str]:
    """The bundle-relative external-data files the ONNX file ``rel`` names, each checked against the
    path rule (relative to the ONNX file's directory, as ONNX Runtime reads them). The ONNX file
    is scanned, not given to a library that would follow the locations."""
    path = resolve_inside(root, rel, "segment file")
    locations = _locations(path, rel)
    return list(dict.fromkeys(location_files(root, rel, locations).values()))


def location_files(root: Path, rel: str, locations: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{location as written in ``rel``: the bundle-relative file it names}, every location checked:
    not ONNX Runtime's reserved in-memory name, and the path rule (relative to ``rel``'s directory)."""
    folder = posixpath.dirname(rel)
    out: dict[str, str] = {}
    for tensor, location in locations:
        where = f"external-data location of tensor {_shown(tensor)} in {rel}"
        reason = location_problem(location)
        if reason is not None:
            raise IntegrityError(f"{where} {_shown(location)} breaks the bundle path rule ({PATH_RULE}): {reason}",
                                 PATH_HINT)
        inner = posixpath.normpath(posixpath.join(folder, location))
        resolve_inside(root, inner, where)
        out[location] = inner
    return out


def location_problem(location: object) -> str | None:
    """Why an external-data ``location`` may not be loaded, or None: the path rule, and ONNX
    Runtime's reserved name ``*/_ORT_MEM_ADDR_/*``, with which ORT reads the tensor from the memory
    address written in its ``offset`` (a pointer, not a file). Recent ORT refuses it in a model it
    loads; mixexport refuses it first, whatever the ORT version."""
    if isinstance(location, str) and ORT_MEMORY_TAG.lower() in location.lower():
        return f"it is ONNX Runtime's reserved in-memory location {ORT_MEMORY_LOCATION!r} (a memory address, not a file)"
    return path_problem(location)


def _locations(path: Path, rel: str) -> list[tuple[str, str]]:
    # Every external-data entry spells its key "location" in the file's bytes (protobuf stores
    # strings as they are), so a file without those bytes names no external data: most segment
    # files are found clean by one byte search, without parsing the whole model.
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if mm.find(b"location") < 0:
                    return []
    except OSError as e:
        raise BadInputError(f"cannot read {rel}: {e.strerror}", "check the bundle's file permissions") from None
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(os.fspath(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"{rel} is not a readable ONNX model ({str(e)[:120]})", CONTENT_HINT) from None
    return model_locations(model, rel)


def model_locations(model: object, rel: str, initializers_only: bool = False) -> list[tuple[str, str]]:
    """(tensor name, location) of every externally stored tensor of the parsed ONNX ``model``.

    ``initializers_only``: refuse external data anywhere but the main graph's initializers (where
    the exporter puts it). A model loaded from memory gets its external data handed over by name
    (:mod:`mixexport.checked_load`); ONNX Runtime looks those names up for main-graph initializers
    only, and would read any other external tensor from a path of its own choosing.
    """
    import onnx

    out = []
    for t, main in _tensors(model):
        entries = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL or entries:
            if "location" not in entries:
                raise IntegrityError(f"tensor {_shown(t.name)} in {rel} is stored externally but names no location",
                                     CONTENT_HINT)
            if initializers_only and not main:
                raise IntegrityError(f"tensor {_shown(t.name)} in {rel} keeps its data in an external file but is not "
                                     "an initializer of the main graph; refusing to load it", CONTENT_HINT)
            out.append((t.name, entries["location"]))
    return out


def check_domains(model: object, rel: str) -> None:
    """Refuse (:class:`IntegrityError`) a node in an op domain outside :data:`ALLOWED_DOMAINS` that
    is not a call of one of the model's own functions: a custom op, whose kernel a bundle cannot
    bring (session options may not register op libraries), so ONNX Runtime could only fail on it."""
    functions = {(f.domain, f.name) for f in model.functions}  # type: ignore[attr-defined]
    graphs = [model.graph]  # type: ignore[attr-defined]
    nodes = [n for f in model.functions for n in f.node]  # type: ignore[attr-defined]
    while graphs or nodes:
        if graphs:
            nodes.extend(graphs.pop().node)
            continue
        node = nodes.pop()
        if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in functions:
            raise IntegrityError(
                f"{rel}: node {_shown(node.name)} is op {_shown(node.op_type)} of the custom-op domain "
                f"{_shown(node.domain)}; a segment may use only the domains {', '.join(map(repr, ALLOWED_DOMAINS))} "
                "(standard ONNX and ONNX Runtime's contrib ops)", CONTENT_HINT)
        for a in node.attribute:
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def _tensors(model: object) -> Iterator[tuple[Any, bool]]:
    """Every TensorProto of an ONNX model: initializers, sparse initializers and attribute tensors of
    the main graph, of every subgraph, of every function and of training graphs; each with whether
    it is an initializer of the main graph."""
    main = model.graph  # type: ignore[attr-defined]
    yield from ((t, True) for t in main.initializer)
    graphs = []
    for info in model.training_info:  # type: ignore[attr-defined]
        graphs += [info.initialization, info.algorithm]
    sparse = list(main.sparse_initializer)
    nodes = list(main.node) + [n for f in model.functions for n in f.node]  # type: ignore[attr-defined]
    attrs = [a for f in model.functions for a in f.attribute_proto]  # type: ignore[attr-defined]
    while graphs or sparse or nodes or attrs:
        if graphs:
            g = graphs.pop()
            yield from ((t, False) for t in g.initializer)
            sparse.extend(g.sparse_initializer)
            nodes.extend(g.node)
        elif sparse:
            sp = sparse.pop()
            yield from ((sp.values, False), (sp.indices, False))
        elif nodes:
            attrs.extend(nodes.pop().attribute)
        else:
            a = attrs.pop()
            if a.HasField("t"):
                yield a.t, False
            yield from ((t, False) for t in a.tensors)
            sparse.extend(a.sparse_tensors)
            if a.HasField("sparse_tensor"):
                sparse.append(a.sparse_tensor)
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


# --------------------------------------------------------------------------------------------
# the parts of an ONNX model the rules read, without its weights

# field numbers of onnx.proto3 (ModelProto, GraphProto, TensorProto)
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER = 7, 1, 5
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14


def onnx_skeleton(data: bytes) -> Any:
    """The ONNX model ``data`` with what :func:`check_domains` and :func:`model_locations` read —
    every node, function, training graph and sparse initializer, and the main-graph initializers
    that keep their data externally — but without the inline weights of the main graph, which are
    skipped on the wire instead of parsed (a copy of all the weights, to read none of them).
    Raises ``ValueError`` on bytes that are not protobuf wire format."""
    import onnx

    data = memoryview(data)  # type: ignore[assignment]  # slices without copies
    graphs, parts = [], []
    for num, wire, first, value, end in _fields(data, 0, len(data)):
        if num == _MODEL_GRAPH and wire == 2:
            graphs.append(data[value:end])
        else:
            parts.append(data[first:end])
    # a field given twice is merged by every protobuf reader, as is the concatenation of the values
    graph = graphs[0] if len(graphs) == 1 else memoryview(b"".join(graphs))
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(parts))
    kept = [graph[first:end] for num, wire, first, value, end in _fields(graph, 0, len(graph))
            if not (num == _GRAPH_INITIALIZER and wire == 2 and not _external(graph, value, end))]
    model.graph.ParseFromString(b"".join(kept))
    return model


def _external(buf: bytes, start: int, end: int) -> bool:
    """Whether the TensorProto ``buf[start:end]`` keeps its data externally (or says it does)."""
    for num, wire, _first, value, _end in _fields(buf, start, end):
        if num == _TENSOR_EXTERNAL_DATA or (num == _TENSOR_DATA_LOCATION and wire == 0
                                            and _varint(buf, value)[0] != 0):
            return True
    return False


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of its key, start of its value, end) of each field of the
    protobuf message ``buf[pos:end]``, read without parsing the values."""
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        value = pos
        if wire == 2:
            n, value = _varint(buf, pos)
            pos = value + n
        elif wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end or num == 0:
            raise ValueError("truncated or malformed protobuf field")
        yield num, wire, first, value, pos


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("malformed protobuf varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
