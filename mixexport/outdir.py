"""Where ``build`` and ``triton`` may write (``--out``), what ``--force`` may replace, and how a
failed write is reported.

- ``--out`` never is, contains or lies inside an input of the command (the checkpoint, ``--data``,
  the bundle a repository is written from): replacing it would delete what the command reads.
- What mixexport writes carries a marker file (:data:`MARKER`, in every bundle and every Triton
  repository). ``--force`` replaces an existing ``--out`` only if it carries the marker or is an
  empty directory: a directory someone else filled is never deleted.
- A write that fails for a reason of the file system (no space, a read-only mount, no permission)
  is one line naming the path (:func:`write_error`), with the exit code of its kind: a full disk
  is the environment (3), an unwritable ``--out`` the user's choice (2). The caller removes its
  temporary directory, so nothing partial is left.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Mapping

from mixexport import __version__
from mixexport.errors import BadInputError, EnvironmentUnavailableError, MixexportError

#: the file that says "mixexport wrote this directory"; its content names the kind and the version
MARKER = ".mixexport-output"
KINDS = ("bundle", "triton-repository")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_marker(directory: Path, kind: str) -> None:
    """Mark ``directory`` (about to be renamed into place) as written by mixexport."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    (Path(directory) / MARKER).write_text(json.dumps({"written_by": "mixexport", "kind": kind,
                                                      "version": __version__}) + "\n")


def marked_kind(directory: Path) -> str | None:
    """What mixexport wrote ``directory`` as (one of :data:`KINDS`), or None: no marker, a marker
    that is a link (placed there, not written), or one that does not parse."""
    marker = Path(directory) / MARKER
    if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, RuntimeError) as e:  # a symbolic-link loop (RuntimeError before Python 3.13)
        raise BadInputError(f"cannot resolve {path}: {e}", "check the links on that path") from None


def _related(out: Path, other: Path) -> str | None:
    """How ``out`` and an input ``other`` (both resolved) overlap, or None."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "lies inside"
    return None


def check_out(out: Path, force: bool, inputs: Mapping[str, Path | str | None] = {},  # noqa: B006 - read only
              kind: str = "bundle") -> None:
    """Refuse (``BadInputError``, exit 2, before any work) an ``out`` that is, contains or lies
    inside any of ``inputs`` (label -> path; links followed), an existing ``out`` without
    ``force``, and with ``force`` one that mixexport did not write as ``kind`` (its
    :data:`MARKER`) unless it is an empty directory."""
    out = Path(out)
    where = _resolved(out)
    for label, path in inputs.items():
        if path is None:
            continue
        how = _related(where, _resolved(Path(path)))
        if how is not None:
            raise BadInputError(f"--out {out} {how} the {label} {path}, which this command reads",
                                "choose an --out outside every input (--force would delete it)")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise BadInputError(f"output directory {out} already exists", "pass --force to replace it")
    if not out.is_dir():
        raise BadInputError(f"output path {out} exists and is not a directory", "choose another --out")
    check_replaceable(out, kind)


def check_replaceable(out: Path, kind: str = "bundle") -> None:
    """With ``--force``: refuse to replace an ``out`` that mixexport did not write as ``kind`` (a
    bundle is not replaced by a Triton repository, nor the reverse) and that is not empty."""
    out = Path(out)
    if out.is_symlink():
        raise BadInputError(f"--out {out} is a symbolic link; --force replaces only a directory mixexport wrote",
                            "pass the directory itself, or choose another --out")
    found = marked_kind(out)
    if found == kind:
        return
    if found is not None:
        raise BadInputError(f"--force: {out} is a {found} written by mixexport, not a {kind}; refusing to replace it",
                            "choose another --out")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise write_error(e, out) from None
    if not empty:
        raise BadInputError(f"--force: {out} was not written by mixexport (no {MARKER} in it) and is not empty; "
                            "refusing to delete it", "remove it yourself if it is yours to delete, or choose "
                            "another --out")


def write_error(e: OSError, path: Path | str) -> MixexportError:
    """One line for a failed write under ``path`` (the output being written): a full disk is the
    environment (exit 3), a read-only or forbidden place the choice of ``--out`` (exit 2); any
    other ``OSError`` is reported as such (exit 2) with its errno name."""
    where = e.filename or path
    if e.errno in _FULL:
        return EnvironmentUnavailableError(f"no space left writing {where} ({os.strerror(e.errno)}); "
                                           "nothing was written", f"free space under {path}, or choose another --out")
    if e.errno in _DENIED:
        return BadInputError(f"cannot write {where}: {os.strerror(e.errno)}; nothing was written",
                             "choose a writable --out")
    name = errno.errorcode.get(e.errno or 0, "error")
    return BadInputError(f"cannot write {where}: {e.strerror or e} ({name}); nothing was written",
                         "check the --out directory and the disk")


def is_write_error(e: BaseException, out: Path) -> bool:
    """Whether ``e`` is a file-system failure to translate with :func:`write_error`: a full disk
    anywhere (the temporary files of a build included), or a refusal on a path under ``out``'s
    parent (where the output and its temporary sibling live)."""
    if not isinstance(e, OSError) or isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if e.errno in _FULL:
        return True
    if e.errno not in _DENIED:
        return False
    if e.filename is None:
        return True  # a refused write of an open file: only the output's files are open for writing
    parent = _resolved(Path(out)).parent
    return parent == _resolved(Path(str(e.filename))) or parent in _resolved(Path(str(e.filename))).parents
