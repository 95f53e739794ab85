"""Load a ``torch.export.save`` archive (``.pt2``) so that no code in it runs, within memory caps.

``torch.export.load`` trusts its input: it unpickles weights, constants and sample inputs with
``weights_only=False`` (or falls back to it), loads ``opaque_obj_*`` constants with plain
``pickle.loads``, evaluates every symbolic-shape string with ``sympy.sympify`` (Python ``eval``)
and would ``dlopen`` an AOTInductor library. A pattern scan of what it might read will always
trail its loader, so this module does not scan; it rebuilds:

1. the file is read **once** into memory, within :data:`MAX_ARCHIVE_BYTES`;
2. the zip directory is checked before anything is inflated: member count, names (one root
   folder, safe characters, no duplicates), no encryption, only stored/deflated members, the sum
   of declared sizes and each deflated member's compression ratio; members are then inflated one
   at a time, capped at their declared size (a lying size fails the CRC/length check);
3. every member is classified by name against the layout ``torch.export.save`` writes; anything
   else is refused: legacy ``data/weights/<model>.pt`` and ``data/constants/<model>.pt``,
   ``custom_obj_*``/``opaque_obj_*`` constants, AOTInductor/ExecuTorch/MTIA payloads, unknown files;
4. every member that is a pickle (sample inputs, ``use_pickle`` weights and constants) must be a
   ``torch.save`` zip archive, loaded with torch's weights-only unpickler (which allows only
   tensors and plain data) and **re-saved by us**; the legacy multi-pickle stream format is
   refused (every stream in it is still unpickled with the weights-only unpickler first, to name
   what it would import);
5. every symbolic-shape expression in ``models/*.json`` must match the grammar ``srepr`` writes
   (allowlisted sympy names, identifier or number strings, arithmetic; no attribute access), and
   no string in it may hold a carriage return or another control character;
6. torch gets a new stored archive built from exactly the checked bytes, in memory: no second
   read of the file, and no member torch would reach through a fallback.

What is not checked: the program's graph is torch's to validate (its verifier refuses operators
that are not torch ops), and a program that loads may still compute anything its torch ops can.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mixexport.errors import BadInputError
from mixexport.pt2.exprs import check_program_strings
from mixexport.pt2.pickles import PickleRefused, reserialize
from mixexport.trust import no_duplicate_keys

ZIP_MAGIC = b"PK\x03\x04"
MAX_ARCHIVE_BYTES = 4 << 30        # the file itself, read once into memory
MAX_DECLARED_BYTES = 4 << 30       # the sum of every member's declared (inflated) size
MAX_MEMBERS = 20_000
MAX_RATIO = 100                    # declared / compressed size of one deflated member ...
RATIO_FREE_BYTES = 1 << 20         # ... unless it declares at most this much
MAX_SMALL_MEMBER = 4096            # archive_format, byteorder, versions, serialization id
MAX_PICKLE_STREAMS = 64            # legacy torch.save files hold 5; only named in the message
MAX_EXPR_CHARS = 20_000

_HINT = "re-export the program with torch.export.save from a model you trust"
_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.\-]{0,199}")
_ROOT = re.compile(r"[^/\\\x00-\x1f\x7f]{1,200}")  # torch names the root folder after the file
_MODEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,199}")


@dataclass(frozen=True)
class LoadedProgram:
    """The program torch loaded from the checked archive, and the sha256 of the file's bytes."""

    program: torch.export.ExportedProgram
    sha256: str


def is_pt2(path: Path) -> bool:
    """Whether ``path`` looks like a torch.export archive (a zip holding ``archive_format`` or a
    ``models/*.json``); only the zip directory is read, nothing is inflated."""
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/archive_format") or "/models/" in n for n in z.namelist()[:MAX_MEMBERS])
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False


def load_program(path: Path) -> LoadedProgram:
    """Read ``path`` once, check it as the module docstring says, and ``torch.export.load`` the
    rebuilt archive from memory. Every problem is a one-line :class:`BadInputError`."""
    raw = _read_once(path)
    digest = hashlib.sha256(raw).hexdigest()
    checked = check_archive(raw, str(path))
    del raw  # torch gets only the rebuilt archive: peak memory stays near two archives
    # torch.export.load logs the real cause of a failure (with a traceback, as do its fake-tensor
    # checks) and then raises a generic error from its pre-2.7 fallback, which cannot match: the
    # rebuilt archive has no bare 'version' member. While it runs, torch's log records go to a
    # handler that keeps their exceptions, so a user sees one line and the real cause.
    with _torch_logs_captured() as errors:
        try:
            program = torch.export.load(checked)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a broken program
            cause = next((x for name, x in errors if name.startswith("torch.export")), e)
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            raise BadInputError(f"{path}: torch.export.load failed: {first[:200]}", _HINT) from None
    return LoadedProgram(program=program, sha256=digest)


@contextlib.contextmanager
def _torch_logs_captured() -> Iterator[list[tuple[str, BaseException]]]:
    """Route every torch logger's records to one handler that keeps (logger name, exception) of
    those with a traceback; the original handlers come back afterwards."""
    capture = _CaptureErrors()
    loggers = [lg for name, lg in logging.root.manager.loggerDict.items()
               if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger) and lg.handlers]
    saved = [(lg, list(lg.handlers)) for lg in loggers]
    for lg, handlers in saved:
        for h in handlers:
            lg.removeHandler(h)
        lg.addHandler(capture)
    try:
        yield capture.errors
    finally:
        for lg, handlers in saved:
            lg.removeHandler(capture)
            for h in handlers:
                lg.addHandler(h)


class _CaptureErrors(logging.Handler):
    """Keeps the exceptions torch logs, with their logger's name, instead of printing tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[tuple[str, BaseException]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append((record.name, record.exc_info[1]))


def _read_once(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, io.SEEK_END)
            if size > MAX_ARCHIVE_BYTES:
                raise BadInputError(f"{path}: {size} bytes, more than the {MAX_ARCHIVE_BYTES} a .pt2 may hold",
                                    "mixexport reads a .pt2 into memory; export a smaller program")
            f.seek(0)
            data = f.read(MAX_ARCHIVE_BYTES + 1)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read: {e.strerror or e}", "check the path and its permissions") from None
    if len(data) != size:
        raise BadInputError(f"{path}: changed while it was read ({size} bytes, then {len(data)})",
                            "do not write the file while mixexport reads it")
    return data


class _Refused(Exception):
    """Raised inside the checks; :func:`check_archive` turns it into one BadInputError line."""


def check_archive(raw: bytes, where: str) -> io.BytesIO:
    """The archive in ``raw`` rebuilt from checked members (a stored zip, in memory, at offset 0),
    or BadInputError."""
    try:
        return _rebuild(raw)
    except (_Refused, PickleRefused) as e:
        raise BadInputError(f"{where}: refused to load: {e}", _HINT) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError,
            RuntimeError, KeyError, IndexError, OverflowError, TypeError) as e:
        # zipfile reports a corrupt directory, a CRC mismatch or a lying size with these
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"{where}: not a readable .pt2 archive (truncated or corrupt?): {first[:160]}",
                            "re-export it with torch.export.save") from None


def _rebuild(raw: bytes) -> io.BytesIO:
    # the C constants, not torch.export (seconds to import): a bomb is refused before that import
    from torch._C._export import pt2_archive_constants as c

    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos = z.infolist()
        root = _check_directory(infos)
        members = {i.filename[len(root) + 1:]: i for i in infos}
        kinds = _classify(z, root, members, c)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
            # one member in memory at a time, cheapest checks first: a member lying about its size
            # is refused before sympy is imported or torch's loader runs
            for name in sorted(members, key=lambda n: getattr(kinds[n], "cost", 0)):
                info = members[name]
                data = _inflate(z, info)
                w.writestr(info.filename, kinds[name](name, data))
    out.seek(0)  # handed to torch as is: no copy
    return out


def _check_directory(infos: list[zipfile.ZipInfo]) -> str:
    if not infos:
        raise _Refused("the archive is empty")
    if len(infos) > MAX_MEMBERS:
        raise _Refused(f"{len(infos)} members, more than {MAX_MEMBERS}")
    root = infos[0].filename.split("/", 1)[0]
    if not _ROOT.fullmatch(root) or root in (".", ".."):
        raise _Refused(f"archive root folder {root[:120]!r} is not a plain name")
    seen: set[str] = set()
    declared = 0
    for i in infos:
        name = i.filename
        parts = name.split("/")
        if parts[0] != root or len(parts) < 2 or not all(_NAME.fullmatch(p) and p not in (".", "..")
                                                          for p in parts[1:]):
            raise _Refused(f"member name {name[:120]!r} is not '{root}/' followed by plain names")
        if name in seen:
            raise _Refused(f"member {name!r} appears twice (readers disagree on which one counts)")
        seen.add(name)
        if i.flag_bits & 0x1:
            raise _Refused(f"member {name!r} is encrypted")
        if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(f"member {name!r} uses compression method {i.compress_type}; "
                           "only stored and deflated members are read")
        if i.compress_type == zipfile.ZIP_STORED and i.file_size != i.compress_size:
            raise _Refused(f"stored member {name!r} declares {i.file_size} bytes but holds {i.compress_size}")
        if (i.compress_type == zipfile.ZIP_DEFLATED and i.file_size > RATIO_FREE_BYTES
                and i.file_size > MAX_RATIO * max(i.compress_size, 1)):
            raise _Refused(f"member {name!r} would inflate {i.compress_size} bytes to {i.file_size} "
                           f"(more than {MAX_RATIO}:1): a zip bomb?")
        declared += i.file_size
        if declared > MAX_DECLARED_BYTES:
            raise _Refused(f"members declare more than {MAX_DECLARED_BYTES} bytes in all")
    return root


def _inflate(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes, never more than it declares: zipfile stops at the declared size and
    checks the CRC, so a member that lies about its size is refused, not inflated."""
    with z.open(info) as f:
        data = f.read(info.file_size + 1)
        if f.read(1):
            raise _Refused(f"member {info.filename!r} holds more than the {info.file_size} bytes it declares")
    if len(data) != info.file_size:
        raise _Refused(f"member {info.filename!r} holds {len(data)} bytes, it declares {info.file_size}")
    return data


Check = Callable[[str, bytes], bytes]


def _classify(z: zipfile.ZipFile, root: str, members: dict[str, zipfile.ZipInfo], c: Any) -> dict[str, Check]:
    """Map every member (name relative to the root) to the check that returns the bytes torch
    will get; refuse a member that torch.export.save does not write."""
    kinds: dict[str, Check] = {}
    fixed = {c.ARCHIVE_FORMAT_PATH: _exactly(c.ARCHIVE_FORMAT_VALUE.encode()),
             c.ARCHIVE_VERSION_PATH: _exactly(c.ARCHIVE_VERSION_VALUE.encode()),
             "byteorder": _one_of(b"little", b"big"), ".data/version": _small, ".data/serialization_id": _small}
    for name in members:
        if name in fixed:
            kinds[name] = fixed[name]
        elif name.startswith(c.EXTRA_DIR):
            kinds[name] = _text
    models = [n[len(c.MODELS_DIR):-len(".json")] for n in members
              if n.startswith(c.MODELS_DIR) and n.endswith(".json")]
    if not models or c.ARCHIVE_FORMAT_PATH not in members:
        raise _Refused(f"no {c.ARCHIVE_FORMAT_PATH} and models/*.json: not a torch.export.save archive "
                       "(the pre-2.7 format is not read)")
    for model in models:
        if not _MODEL.fullmatch(model):
            raise _Refused(f"model name {model!r} is not a plain name")
        needed = (c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), c.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model),
                  c.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model))
        missing = [n for n in needed if n not in members]
        if missing:
            raise _Refused(f"model {model!r} has no {', '.join(missing)}")
        kinds[c.MODELS_FILENAME_FORMAT.format(model)] = _program_json
        kinds[c.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)] = _sample_inputs
        for legacy in (f"{c.WEIGHTS_DIR}{model}.pt", f"{c.CONSTANTS_DIR}{model}.pt"):
            if legacy in members:
                raise _Refused(f"member {legacy!r} is torch's legacy weights/constants file, which torch "
                               "unpickles with weights_only=False; it is never read")
        for config_fmt, folder in ((c.WEIGHTS_CONFIG_FILENAME_FORMAT, c.WEIGHTS_DIR),
                                   (c.CONSTANTS_CONFIG_FILENAME_FORMAT, c.CONSTANTS_DIR)):
            config = config_fmt.format(model)
            kinds[config] = _json_bytes
            for path_name, use_pickle, extent in _payload_entries(z, members[config], config, c):
                kinds[folder + path_name] = _torch_artifact(_tensor) if use_pickle else _raw_tensor_bytes
                held = members[folder + path_name].file_size if folder + path_name in members else None
                if not use_pickle and held is not None and extent > held:
                    # torch would index past the record, or (for an empty record) allocate the
                    # whole tensor from the config's sizes alone: a memory bomb in a few bytes
                    raise _Refused(f"{config}: {path_name!r} holds {held} bytes, its tensor_meta needs {extent}")
    for name in members:
        if name not in kinds:
            raise _Refused(f"unexpected member {name!r}: {_why_unknown(name, c)}")
    return kinds


def _why_unknown(name: str, c: Any) -> str:
    if name.startswith((c.AOTINDUCTOR_DIR, c.EXECUTORCH_DIR, c.MTIA_DIR)):
        return "compiled native code (AOTInductor/ExecuTorch/MTIA) is never loaded from a .pt2 input"
    if name.startswith(c.CONSTANTS_DIR) and c.OPAQUE_OBJ_FILENAME_PREFIX in name:
        return "an opaque object, which torch loads with plain pickle.loads"
    if name.startswith(c.CONSTANTS_DIR) and c.CUSTOM_OBJ_FILENAME_PREFIX in name:
        return "a TorchScript custom object, which torch unpickles with its own classes"
    return "torch.export.save does not write it (or no payload config names it)"


def _payload_entries(z: zipfile.ZipFile, info: zipfile.ZipInfo, config: str,
                     c: Any) -> list[tuple[str, bool, int]]:
    """(path_name, use_pickle, bytes its raw tensors reach) of a weights/constants payload config."""
    try:
        doc = json.loads(_inflate(z, info), object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"{config} is not valid JSON ({str(e)[:80]})") from None
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise _Refused(f"{config} has no 'config' object")
    out = []
    for fqn, entry in entries.items():
        path_name = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(path_name, str) or not _NAME.fullmatch(path_name):
            raise _Refused(f"{config}: entry {str(fqn)[:80]!r} has no plain path_name")
        if path_name.startswith(c.OPAQUE_OBJ_FILENAME_PREFIX):
            raise _Refused(f"{config}: constant {str(fqn)[:80]!r} ({path_name}) is an opaque object, which torch loads "
                           "with plain pickle.loads; it is never read")
        if path_name.startswith(c.CUSTOM_OBJ_FILENAME_PREFIX):
            raise _Refused(f"{config}: constant {str(fqn)[:80]!r} ({path_name}) is a TorchScript custom object; "
                           "it is never read")
        if "constants" in config and not path_name.startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise _Refused(f"{config}: constant {str(fqn)[:80]!r} has path_name {path_name!r}; only "
                           f"{c.TENSOR_CONSTANT_FILENAME_PREFIX}* tensors are read")
        use_pickle = entry.get("use_pickle")
        if not isinstance(use_pickle, bool):
            raise _Refused(f"{config}: entry {str(fqn)[:80]!r} has use_pickle {use_pickle!r}, not a boolean")
        out.append((path_name, use_pickle, 0 if use_pickle else _extent(config, str(fqn), entry.get("tensor_meta"))))
    kinds: dict[str, tuple[bool, int]] = {}
    for path_name, use_pickle, extent in out:
        seen, reach = kinds.setdefault(path_name, (use_pickle, extent))
        if seen != use_pickle:
            raise _Refused(f"{config}: {path_name!r} is named both as a pickle and as raw bytes")
        kinds[path_name] = (use_pickle, max(reach, extent))
    return [(p, u, e) for p, (u, e) in kinds.items()]


# bytes per element of torch/_export/serde/schema.py's ScalarType codes
_ELEMENT_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2, 28: 2,
                  29: 1, 30: 1, 31: 1, 32: 1, 33: 1, 34: 4, 35: 8}


def _extent(config: str, fqn: str, meta: Any) -> int:
    """How many bytes of its record a raw tensor reaches: (offset + Σ (size-1)·stride + 1) · element
    size, 0 for an empty tensor; refuse what is not concrete, non-negative integers."""
    def ints(values: Any) -> list[int]:
        if not isinstance(values, list) or not all(
                isinstance(v, dict) and type(v.get("as_int")) is int and v["as_int"] >= 0 for v in values):
            raise _Refused(f"{config}: entry {fqn[:80]!r} has sizes/strides that are not non-negative integers")
        return [v["as_int"] for v in values]

    if not isinstance(meta, dict) or meta.get("dtype") not in _ELEMENT_BYTES:
        raise _Refused(f"{config}: entry {fqn[:80]!r} has no tensor_meta with a known dtype")
    sizes, strides, (offset,) = ints(meta.get("sizes")), ints(meta.get("strides")), ints([meta.get("storage_offset")])
    if len(sizes) != len(strides):
        raise _Refused(f"{config}: entry {fqn[:80]!r} has {len(sizes)} sizes and {len(strides)} strides")
    if 0 in sizes:
        return 0
    return (offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * _ELEMENT_BYTES[meta["dtype"]]


# --- the checks: each returns the bytes torch will get ------------------------------------------

def _exactly(expected: bytes) -> Check:
    def check(name: str, data: bytes) -> bytes:
        if data != expected:
            raise _Refused(f"{name} is {data[:40]!r}, expected {expected!r}")
        return data
    return check


def _one_of(*allowed: bytes) -> Check:
    def check(name: str, data: bytes) -> bytes:
        if data not in allowed:
            raise _Refused(f"{name} is {data[:40]!r}, expected one of {allowed}")
        return data
    return check


def _small(name: str, data: bytes) -> bytes:
    if len(data) > MAX_SMALL_MEMBER:
        raise _Refused(f"{name} holds {len(data)} bytes, expected at most {MAX_SMALL_MEMBER}")
    return _text(name, data)


def _text(name: str, data: bytes) -> bytes:
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x80")):
        raise _Refused(f"{name} is a zip archive or a pickle, not text: nested archives are not read")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(f"{name} is not UTF-8 text") from None
    return data


def _raw_tensor_bytes(name: str, data: bytes) -> bytes:
    """Raw storage bytes: torch copies them into a tensor of the dtype its config names."""
    return data


def _json_bytes(name: str, data: bytes) -> bytes:
    try:
        json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"{name} is not valid JSON ({str(e)[:80]})") from None
    return data


def _program_json(name: str, data: bytes) -> bytes:
    try:
        doc = json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise _Refused(f"{name} is not valid JSON ({str(e)[:80]})") from None
    problem = check_program_strings(doc)
    if problem:
        raise _Refused(f"{name}: {problem}")
    return data


_program_json.cost = 1  # type: ignore[attr-defined]  # imports sympy


def _torch_artifact(check_value: Callable[[str, Any], None]) -> Check:
    def check(name: str, data: bytes) -> bytes:
        value = reserialize(name, data)
        check_value(name, value)
        buf = io.BytesIO()
        torch.save(value, buf)  # pickles that we write from tensors and plain data
        return buf.getvalue()
    check.cost = 2  # type: ignore[attr-defined]
    return check


def _tensor(name: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise _Refused(f"{name} holds a {type(value).__name__}, expected a tensor")


def _inputs(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, dict)):
        raise _Refused(f"{name} holds a {type(value).__name__}, expected the (args, kwargs) sample inputs")


_sample_inputs = _torch_artifact(_inputs)
