"""Load exactly the bytes that were checked.

A sha256 check on a path followed by a load from the same path leaves a window: whoever can write
into the bundle directory can swap the file in between (rename another over it, or replace it with
a symbolic link to a file elsewhere), and the loader opens the new one. Here every file a backend
loads is opened once, read once into this process's own memory, its sha256 compared with the
manifest's ``files`` entry, and *those bytes* — never the path — are handed to the loader:

- **ONNX Runtime**: ``InferenceSession(model_bytes)``; every external-data file the checked model
  names is handed over from memory too (``SessionOptions.add_external_initializers_from_files_in_memory``,
  one buffer per ``location`` string), and external data is allowed only on main-graph
  initializers, the tensors ORT looks up in that table. ORT opens no file of the bundle.
- **TensorRT / TensorRT-RTX**: ``Runtime.deserialize_cuda_engine(plan_bytes)``.
- **AOTInductor**: torch's loader takes a path only (given a file object, torch itself writes it to
  a named temporary file). :func:`private_copy` writes the checked bytes into a new file (``O_EXCL``,
  mode 0600) in a new directory only this user can enter (mode 0700), loads from there, and removes
  both once the package is loaded. Only this user (or root) can touch that copy — who could also
  attach a debugger to the process; torch then unpacks the package into its own private temporary
  directory and ``dlopen`` s the library from it, which we do not control.

The path rule still holds for the file actually opened: after ``open`` its device and inode must be
those of the path as resolved inside the bundle, so a link swapped in between is refused, not read.
A file that is neither regular nor inside is never read (no FIFO to block on, no device).

Memory: each file is read once into private memory (not memory-mapped: a mapping of the bundle's
file would show a later in-place write, so the loaded bytes could differ from the hashed ones).
ONNX Runtime copies the external data into its own buffers while the session is created; the
checked copies are released right after, so a model's weights are held twice only during the open.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from mixexport.errors import BadInputError, IntegrityError
from mixexport.trust import (CONTENT_HINT, PATH_HINT, PATH_RULE, check_domains, location_files, model_locations,
                             onnx_skeleton, resolve_inside)

if TYPE_CHECKING:
    from mixexport.bundle import Manifest, SegmentEntry

_CHUNK = 1 << 30  # one read() of a regular file returns at most ~2 GiB on Linux


@dataclass
class CheckedFile:
    """A bundle file's bytes as read once, whose sha256 matched the manifest (unless read with
    ``hashes=False``). ``data`` is private to this process: nothing on disk changes it."""

    rel: str
    data: bytes | bytearray


@dataclass
class CheckedOnnx:
    """An ONNX segment as checked: the model's bytes and, by ``location`` string as written in the
    model, the checked bytes of each external-data file it names."""

    rel: str
    model: bytes
    external: dict[str, CheckedFile] = field(default_factory=dict)


def read_checked(root: Path, files: Mapping[str, str], rel: str, hashes: bool = True,
                 as_bytes: bool = False) -> CheckedFile:
    """Open ``rel`` inside the bundle ``root`` once, read it, and check the sha256 of exactly those
    bytes against ``files[rel]``; raise :class:`IntegrityError` naming the file otherwise.

    ``hashes=False`` skips the sha256 (and the unlisted-file refusal), for a caller that checked the
    files already; the path rule always applies. ``as_bytes``: return ``bytes`` (what ONNX Runtime
    takes for a model) instead of a ``bytearray``.
    """
    digest = files.get(rel)
    if hashes and digest is None:
        raise IntegrityError(f"{rel} has no sha256 in the manifest's files; refusing to load an unverified file",
                             CONTENT_HINT)
    fd = _open_inside(root, rel)
    try:
        size = os.fstat(fd).st_size
        data = _read_bytes(fd, size) if as_bytes else _read_bytearray(fd, size)
    except OSError as e:
        raise BadInputError(f"cannot read {rel}: {e.strerror}", "check the bundle's file permissions") from None
    finally:
        os.close(fd)
    if hashes and hashlib.sha256(data).hexdigest() != digest:
        raise IntegrityError(f"{rel} does not match its sha256 in the manifest (changed after the build); "
                             "refusing to load it", CONTENT_HINT)
    return CheckedFile(rel, data)


def read_checked_onnx(root: Path, files: Mapping[str, str], rel: str, hashes: bool = True,
                      with_external: bool = True) -> CheckedOnnx:
    """The ONNX file ``rel`` and every external-data file it names, each read once and checked
    (:func:`read_checked`). The external-data locations and the op domains are taken from the
    checked bytes themselves (:func:`mixexport.trust.check_domains`, the path rule and ORT's
    reserved in-memory name refused). ``with_external=False``: the locations are checked, the
    files not read (a reader that needs the graph only)."""
    from google.protobuf.message import DecodeError

    model = read_checked(root, files, rel, hashes, as_bytes=True)
    try:
        proto = onnx_skeleton(model.data)  # type: ignore[arg-type]
    except (DecodeError, ValueError, RuntimeError) as e:
        raise IntegrityError(f"{rel} is not a readable ONNX model ({str(e)[:120]})", CONTENT_HINT) from None
    check_domains(proto, rel)
    where = location_files(root, rel, model_locations(proto, rel, initializers_only=True))
    by_file: dict[str, CheckedFile] = {}
    if not with_external:
        return CheckedOnnx(rel, model.data)  # type: ignore[arg-type]
    for inner in dict.fromkeys(where.values()):
        by_file[inner] = read_checked(root, files, inner, hashes)
    return CheckedOnnx(rel, model.data, {loc: by_file[inner] for loc, inner in where.items()})  # type: ignore[arg-type]


def read_segment(manifest: Manifest, segment: SegmentEntry, backend: str,
                 hashes: bool = True) -> CheckedFile | CheckedOnnx | None:
    """What ``backend`` loads for ``segment``, read and checked: its engine for that backend (an
    AOTI package, a TensorRT plan) when the manifest records one, else for ONNX Runtime the ONNX
    file with its external data; None when the backend loads no bundle file."""
    engine = segment.engines.get(backend)
    if engine:
        return read_checked(manifest.root, manifest.data["files"], engine, hashes, as_bytes=True)
    if backend == "onnxruntime":
        return read_checked_onnx(manifest.root, manifest.data["files"], segment.file, hashes)
    return None


def read_segments(manifest: Manifest, backends: Mapping[str, Any],
                  hashes: bool = True) -> dict[str, CheckedFile | CheckedOnnx | None]:
    """Step one of an open: every file of every segment of ``manifest`` (``backends``: segment name →
    backend) read once and checked (:func:`read_segment`), before anything is loaded. A backend
    without ``loads_checked`` reads its files itself in ``prepare``; here they are checked by
    :meth:`~mixexport.bundle.Manifest.check_loadable` (the check-then-load window stays for it)."""
    checked: dict[str, CheckedFile | CheckedOnnx | None] = {}
    for seg in manifest.segments:
        backend = backends[seg.name]
        if getattr(backend, "loads_checked", False):
            checked[seg.name] = read_segment(manifest, seg, backend.name, hashes)
        else:
            manifest.check_loadable([(seg, backend.name)], hashes=hashes)
    return checked


def open_sessions(manifest: Manifest, backends: Mapping[str, Any],
                  checked: dict[str, CheckedFile | CheckedOnnx | None]) -> dict[str, Any]:
    """Step two: one session per segment, each created from its checked bytes (:func:`read_segments`;
    each entry is dropped once used, so the checked copies go as the sessions come). On a failure
    the sessions created so far are closed."""
    sessions: dict[str, Any] = {}
    try:
        for seg in manifest.segments:
            backend = backends[seg.name]
            if seg.name in checked:
                sessions[seg.name] = backend.prepare(manifest, seg, checked=checked.pop(seg.name))
            else:
                sessions[seg.name] = backend.prepare(manifest, seg)
    except BaseException:
        for session in sessions.values():
            session.close()
        raise
    return sessions


@contextlib.contextmanager
def private_copy(data: bytes | bytearray, name: str) -> Iterator[Path]:
    """A file holding ``data``, in a new directory only this user can enter (``mkdtemp``: mode
    0700), created with ``O_EXCL | O_NOFOLLOW`` and mode 0600; both are removed on exit. For loaders
    that take only a path (AOTInductor)."""
    folder = tempfile.mkdtemp(prefix="mixexport-load-")
    try:
        path = os.path.join(folder, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield Path(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _open_inside(root: Path, rel: str) -> int:
    """An open file descriptor of ``rel``, proven after the open to be the regular file that ``rel``
    resolves to inside the bundle (device and inode compared): a swap between the path check and
    the open is refused, not read."""
    path = resolve_inside(root, rel, "file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO swapped in cannot block the open
    except FileNotFoundError:
        raise IntegrityError(f"{rel} is missing from the bundle (or is not a regular file); refusing to load it",
                             CONTENT_HINT) from None
    except OSError as e:
        raise BadInputError(f"cannot open {rel}: {e.strerror}", "check the bundle's file permissions") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise IntegrityError(f"{rel} is missing from the bundle (or is not a regular file); refusing to load it",
                                 CONTENT_HINT)
        real = os.path.realpath(resolve_inside(root, rel, "file"))  # the rule again, after the open
        try:
            now = os.stat(real)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise IntegrityError(f"file {rel!r} breaks the bundle path rule ({PATH_RULE}): the file opened is not "
                                 "the one the path resolves to inside the bundle (it was replaced while opening)",
                                 PATH_HINT)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _read_bytearray(fd: int, size: int) -> bytearray:
    """Exactly ``size`` bytes from ``fd`` (a file that shrank meanwhile: fewer; its hash then fails)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
        while got < size:
            n = f.readinto(view[got:got + _CHUNK])
            if not n:
                break
            got += n
    view.release()
    if got < size:
        del buf[got:]
    return buf


def _read_bytes(fd: int, size: int) -> bytes:
    first = os.read(fd, size) if size else b""
    if len(first) >= size:
        return first
    parts = [first]  # a short read: rare for a regular file (reads over ~2 GiB)
    got = len(first)
    while got < size:
        more = os.read(fd, min(size - got, _CHUNK))
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
