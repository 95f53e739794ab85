"""The bundle: the in-memory state passes transform (:class:`Bundle`) and the directory ``build``
writes (``manifest.json`` is its single source of truth, read back as :class:`Manifest`).

Directory layout::

    manifest.json          schema_version, versions, model, segments, caches, passes, files, parity
    segments/<name>.onnx   (+ .onnx.data past 2 GB)
    engines/<name>.<backend>.<arch>.plan|.pt2
    reports/parity.json, latency.json, report.md, latency.png
    inputs/sample.npz      the exact request used for the build-time checks

A bundle is written into a temporary sibling directory and renamed into place only when complete,
so a server never sees a half-written bundle; ``--force`` swaps the old one out after that.

A bundle is also a trust boundary (:mod:`mixexport.trust`): :func:`read_manifest` validates the
manifest in full (:mod:`mixexport.manifest_check`) and refuses any path that leaves the bundle;
:meth:`Manifest.file` resolves paths under the same rule; :func:`check_integrity` (``verify``) and
:meth:`Manifest.check_files` (``Runtime.open``) compare files with their sha256 before use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import onnx

from mixexport import __version__
from mixexport.errors import BadInputError, GateFailedError, IntegrityError
from mixexport.manifest_check import validate
from mixexport.outdir import check_out, check_replaceable, is_write_error, write_error, write_marker
from mixexport.specs import TensorSpec
from mixexport.trust import check_files, external_data_files, file_digest, no_duplicate_keys, resolve_inside

if TYPE_CHECKING:  # the build side's loader imports torch: serving a bundle never does
    from mixexport.source import Source

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("program", "onnx")


@dataclass(frozen=True)
class Segment:
    """One graph of the bundle; ``role`` says how the runtime feeds it (full rows, users, items)."""

    name: str
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    program: Any = None          # torch.export.ExportedProgram (program stage; kept for engine targets)
    onnx: onnx.ModelProto | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs]}


@dataclass(frozen=True)
class CacheSpec:
    """A per-user cache the later segments read (e.g. the K/V of the behaviour sequence): built by
    the ``producer`` segment from the sequence ``input``, one position per ``items_per_position``
    behaviours along each tensor's ``seq_axis``; ``appendable`` when positions are independent.

    ``layout`` declares every tensor: ``kind`` (``keys`` or ``values`` of sequence attention number
    ``attention``, in graph order, or ``other``, e.g. a padding mask) and ``positions``:
    ``"per-position"`` (its ``seq_axis`` grows with the sequence) or ``"window"`` (a fixed number of
    the most recent positions, ``window`` of them, recomputed from the newest behaviours on an
    append)."""

    name: str
    producer: str
    tensors: tuple[TensorSpec, ...]
    seq_axis: dict[str, int]
    input: str
    items_per_position: int
    bytes_per_position: int
    appendable: bool
    layout: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: inputs sliced with ``input`` on an append: its rows looked up by a table store (externalize-embeddings)
    along: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tensors"] = [t.to_json() for t in self.tensors]
        return d


@dataclass(frozen=True)
class PassRecord:
    name: str
    options: dict[str, Any]
    report: dict[str, Any]


@dataclass(frozen=True)
class Bundle:
    """What passes read and return. Frozen: a pass builds a new one with :meth:`replace`."""

    source: Source
    stage: str
    segments: tuple[Segment, ...]
    caches: tuple[CacheSpec, ...] = ()
    passes: tuple[PassRecord, ...] = ()
    precision: str = "fp32"
    tables: tuple[Any, ...] = ()   # externalize-embeddings: mixexport.tables.writer.TableData, not yet written

    def replace(self, **changes: Any) -> Bundle:
        return dataclasses.replace(self, **changes)

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(name)


def library_versions() -> dict[str, str | None]:
    import numpy
    import onnxruntime
    import torch

    return {"mixexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "tensorrt": None, "cuda": torch.version.cuda, "gpu": None}


# --------------------------------------------------------------------------------------------
# writing

class BundleWriter:
    """Collects files in a temp dir next to ``out``; :meth:`commit` writes the manifest (with every
    file's sha256) and renames the directory into place. Leaving the ``with`` block without a
    commit (an error, Ctrl-C) removes the temp dir and leaves ``out`` untouched."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out = Path(out)
        self.force = force
        recover_stale(self.out)
        check_out_dir(self.out, force)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-", dir=self.out.parent))
        except OSError as e:
            raise write_error(e, self.out) from None
        self.committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if exc is not None and is_write_error(exc, self.out):  # full disk, read-only: one line, not a traceback
            raise write_error(exc, self.out) from exc

    def path(self, rel: str) -> Path:
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, rel: str, data: Any) -> Path:
        if rel == MANIFEST:
            # an interim manifest (the build's own verify and bench read it) lists the files written
            # so far with their sha256: those runs load files under the same checks as a server's
            data = {**data, "files": self.hashes()}
        p = self.path(rel)
        p.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
        return p

    def hashes(self) -> dict[str, str]:
        """sha256 of every file written so far (the manifest excluded), by bundle-relative path."""
        return {rel: file_digest(self.tmp / rel) for rel in self._files()}

    def commit(self, manifest: dict[str, Any]) -> Path:
        manifest = dict(manifest)
        write_marker(self.tmp, "bundle")  # says who may replace the directory; listed like every other file
        manifest["files"] = self.hashes()
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
        old = None
        if self.out.exists():
            if not self.force:
                raise BadInputError(f"{self.out} appeared while building", "use --force to replace it")
            check_replaceable(self.out)  # again: the directory may have been filled while building
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def _files(self) -> Iterator[str]:
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                yield p.relative_to(self.tmp).as_posix()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_stale(out: Path) -> list[str]:
    """Clean up after builds of ``out`` that were killed (SIGKILL, power loss): their temp dirs
    (``.<name>.tmp-<pid>-*`` of processes that no longer run) are removed; a previous bundle moved
    aside by an interrupted ``--force`` swap (``.<name>.old-<pid>-*``) is put back if ``out`` is
    missing, removed otherwise. Returns what was done."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    done: list[str] = []
    if not parent.is_dir():
        return done
    for p in sorted(parent.glob(f".{out.name}.tmp-*")) + sorted(parent.glob(f".{out.name}.old-*")):
        parts = p.name[len(out.name) + 2:].split("-")  # "tmp-<pid>-<random>" / "old-<pid>-<ns>"
        if len(parts) < 3 or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        if ".old-" in p.name and not out.exists():
            os.replace(p, out)
            done.append(f"restored {out} from {p.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


def check_out_dir(out: Path, force: bool, inputs: dict[str, Path | str | None] | None = None) -> None:
    """Refuse, before any work, an ``out`` that is, contains or lies inside one of ``inputs``, an
    existing ``out`` without ``force`` or (with it) not written by mixexport and not empty
    (:func:`mixexport.outdir.check_out`), and an unwritable parent."""
    out = Path(out)
    check_out(out, force, inputs or {})
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise BadInputError(f"cannot write {out}: {parent} is a file, not a directory", "choose another --out")
    if not parent.is_dir():
        raise BadInputError(f"cannot write {out}: parent directory {parent} does not exist",
                            "create it first or choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {out}: parent directory {parent} is not writable",
                            "choose a writable --out")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)  # type: ignore[arg-type]
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --------------------------------------------------------------------------------------------
# reading

@dataclass(frozen=True)
class SegmentEntry:
    name: str
    role: str
    file: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    engines: dict[str, str] = field(default_factory=dict)   # backend -> file
    session_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]
    segments: tuple[SegmentEntry, ...]
    sha256: str = ""   # of manifest.json's bytes as read (pin it: ``read_manifest(..., sha256=)``)

    @property
    def source(self) -> dict[str, Any]:
        return self.data["model"]["source"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_json(s) for s in self.data["model"]["inputs"])

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_json(s) for s in self.data["model"]["outputs"])

    def file(self, rel: str) -> Path:
        """The path of ``rel`` inside the bundle, refused (:class:`IntegrityError`) unless it is
        relative, without ``..``, and resolves inside the bundle directory (links followed)."""
        return resolve_inside(self.root, rel, "bundle path")

    def loaded_files(self, segment: SegmentEntry, backend: str) -> list[str]:
        """The files ``backend`` loads for ``segment``: its engine for that backend (an AOTI package,
        a TensorRT plan) if the manifest records one, else for ONNX Runtime the ONNX file and the
        external-data files it names (their locations checked against the path rule)."""
        engine = segment.engines.get(backend)
        if engine:
            return [engine]
        if backend == "onnxruntime":
            return [segment.file, *external_data_files(self.root, segment.file)]
        return []

    def check_files(self, rels: list[str]) -> None:
        """Refuse (:class:`IntegrityError`, the file named) any of ``rels`` that is missing, unlisted
        in ``files`` or does not match its sha256 there."""
        check_files(self.root, self.data["files"], rels)

    def check_loadable(self, plan: list[tuple[SegmentEntry, str]], hashes: bool = True) -> None:
        """Every check on the files each (segment, backend) of ``plan`` will load, before any is
        loaded: the path rule (ONNX external-data locations included) and, with ``hashes``, each
        file's sha256 (:meth:`loaded_files`, :meth:`check_files`). The ONNX files are scanned for
        external-data locations in a worker thread while this one hashes (hashlib releases the GIL,
        the byte search does not): on two cores the two overlap."""
        first = {seg.name: seg.engines.get(backend) or (seg.file if backend == "onnxruntime" else None)
                 for seg, backend in plan}
        to_scan = [seg.file for seg, backend in plan if first[seg.name] == seg.file]
        with ThreadPoolExecutor(max_workers=1) as pool:
            scans = [pool.submit(external_data_files, self.root, rel) for rel in to_scan]
            if hashes:
                self.check_files([rel for rel in first.values() if rel])
            extra = [rel for job in scans for rel in job.result()]
        if hashes:
            self.check_files(extra)


_REQUIRED = {"schema_version": int, "versions": dict, "model": dict, "target": str, "segments": list,
             "caches": list, "passes": list, "files": dict}
_REQUIRED_MODEL = {"source": dict, "inputs": list, "outputs": list}
MAX_MANIFEST_BYTES = 64 * 1024**2


def read_manifest(bundle_dir: str | Path, sha256: str | None = None) -> Manifest:
    """Read and validate ``manifest.json``; every problem is one :class:`BadInputError` line, and a
    path that leaves the bundle an :class:`IntegrityError` (see :mod:`mixexport.manifest_check`).

    ``sha256``: the manifest's own digest as published (e.g. by a model registry); a manifest whose
    bytes do not match it is refused before it is parsed.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise BadInputError(f"{root} is not a bundle directory", "pass the --out of `mixexport build`")
    if not path.is_file():
        raise BadInputError(f"{root} has no {MANIFEST}", "pass the --out of `mixexport build`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BadInputError(f"{path} is {path.stat().st_size} bytes, more than a manifest's "
                            f"{MAX_MANIFEST_BYTES}", "rebuild the bundle")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if sha256 is not None and digest != sha256.strip().lower():
        raise IntegrityError(f"{path} has sha256 {digest}, not the pinned {sha256.strip()[:64]}",
                             "the manifest is not the one that was published; fetch the bundle again")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys,
                          parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({str(e)[:200]})", "rebuild the bundle") from None
    except RecursionError:
        raise BadInputError(f"{path} is nested too deeply to be a manifest", "rebuild the bundle") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object, found {type(data).__name__}", "rebuild the bundle")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise BadInputError(f"{path}: bundle schema version {version} is newer than this mixexport "
                            f"supports ({SCHEMA_VERSION})", "upgrade mixexport to read this bundle")
    _check_keys(path, "manifest", data, _REQUIRED)
    if version != SCHEMA_VERSION:
        raise BadInputError(f"{path}: unsupported bundle schema version {version!r} (expected "
                            f"{SCHEMA_VERSION})", "rebuild the bundle with this mixexport")
    _check_keys(path, "model", data["model"], _REQUIRED_MODEL)
    validate(path, root, data)
    segments = tuple(
        SegmentEntry(name=seg["name"], role=seg["role"], file=seg["file"], backend=seg["backend"],
                     inputs=tuple(TensorSpec.from_json(s) for s in seg["inputs"]),
                     outputs=tuple(TensorSpec.from_json(s) for s in seg["outputs"]),
                     engines=dict(seg.get("engines") or {}), session_options=dict(seg.get("session_options") or {}))
        for seg in data["segments"])
    return Manifest(root=root, data=data, segments=segments, sha256=digest)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_keys(path: Path, where: str, obj: Any, required: dict[str, type]) -> None:
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: {where} must be an object, found {type(obj).__name__}",
                            "rebuild the bundle")
    for key, typ in required.items():
        if key not in obj:
            raise BadInputError(f"{path}: {where} is missing {key!r}", "rebuild the bundle")
        if not isinstance(obj[key], typ):
            raise BadInputError(f"{path}: {where}.{key} must be {typ.__name__}, found "
                                f"{type(obj[key]).__name__}", "rebuild the bundle")


def check_integrity(manifest: Manifest) -> None:
    """Every file listed in the manifest exists with its sha256, nothing unlisted is referenced, and
    every external-data location inside every ONNX file obeys the path rule and is listed.

    Raises :class:`GateFailedError` naming every missing or changed file (an
    :class:`IntegrityError` for a path that leaves the bundle).
    """
    problems = []
    for rel, digest in manifest.data["files"].items():
        p = manifest.file(rel)
        if not p.is_file():
            problems.append(f"missing {rel}")
        elif file_digest(p) != digest:
            problems.append(f"changed {rel}")
    listed = set(manifest.data["files"])
    referenced = [rel for seg in manifest.segments for rel in [seg.file, *seg.engines.values()]]
    for rel in sorted(listed):
        if rel.endswith(".onnx") and manifest.file(rel).is_file():
            referenced += external_data_files(manifest.root, rel)
    for rel in dict.fromkeys(referenced):
        if rel not in listed:
            problems.append(f"unlisted {rel}")
    if problems:
        raise GateFailedError(f"bundle integrity check failed: {', '.join(problems)}",
                              "the bundle was modified after build; rebuild it")
