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
- **Content** (:func:`check_files`). A file is loaded only after its sha256 matched the manifest's
  ``files`` entry; a file without an entry is refused as unverified. ``verify`` checks every file;
  ``Runtime.open`` checks the files it is about to load (unless ``verify_files=False``).

Every refusal is an :class:`~mixexport.errors.IntegrityError` (exit 1) naming the path and the rule.

The content check pins files to the manifest, so it protects against tampering only as far as the
manifest itself is trusted: pin the manifest's own sha256 (``read_manifest(..., sha256=)``,
``Runtime.open(..., manifest_sha256=)``, ``mixexport verify --manifest-sha256``). The checks run
before loading, not atomically with it: whoever can write into the bundle directory *while* a
process opens it can swap a file between the two.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import posixpath
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from mixexport.errors import BadInputError, IntegrityError

PATH_RULE = "relative, no '..', resolving inside the bundle"
PATH_HINT = ("a bundle is a trust boundary: nothing outside it is read; rebuild the bundle, or fetch it "
             "again from where it was published")
CONTENT_HINT = "the bundle was modified after it was built; rebuild it, or fetch it again from where it was published"
MAX_PATH = 1024


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "…" + text[-8:]


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
    folder = posixpath.dirname(rel)
    out: list[str] = []
    for tensor, location in locations:
        where = f"external-data location of tensor {_shown(tensor)} in {rel}"
        reason = path_problem(location)
        if reason is not None:
            raise IntegrityError(f"{where} {_shown(location)} breaks the bundle path rule ({PATH_RULE}): {reason}",
                                 PATH_HINT)
        inner = posixpath.normpath(posixpath.join(folder, location))
        resolve_inside(root, inner, where)
        if inner not in out:
            out.append(inner)
    return out


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
    out = []
    for t in _tensors(model):
        entries = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL or entries:
            if "location" not in entries:
                raise IntegrityError(f"tensor {_shown(t.name)} in {rel} is stored externally but names no location",
                                     CONTENT_HINT)
            out.append((t.name, entries["location"]))
    return out


def _tensors(model: object) -> Iterator[object]:
    """Every TensorProto of an ONNX model: initializers, sparse initializers and attribute tensors of
    the main graph, of every subgraph, of every function and of training graphs."""
    graphs = [model.graph]  # type: ignore[attr-defined]
    nodes = [n for f in model.functions for n in f.node]  # type: ignore[attr-defined]
    attrs = [a for f in model.functions for a in f.attribute_proto]  # type: ignore[attr-defined]
    for info in model.training_info:  # type: ignore[attr-defined]
        graphs += [info.initialization, info.algorithm]
    while graphs or nodes or attrs:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for s in g.sparse_initializer:
                yield from (s.values, s.indices)
            nodes.extend(g.node)
        elif nodes:
            attrs.extend(nodes.pop().attribute)
        else:
            a = attrs.pop()
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            for s in a.sparse_tensors:
                yield from (s.values, s.indices)
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)
