"""The pickled members of a ``.pt2`` (sample inputs, ``use_pickle`` weights and constants): load
them with torch's weights-only unpickler, never with ``pickle``.

Only ``torch.save``'s zip format is read: a zip of stored members holding exactly one pickle
stream (``data.pkl``) and raw storages. It is rebuilt from the members :mod:`zipfile` sees before
``torch.load(weights_only=True)`` reads it, so torch's zip reader cannot see anything else (a
deflated record, a second directory). The legacy stream format (several pickles in one file,
storages after them), and a bare pickle, are refused; every pickle stream in them is first
unpickled with the weights-only unpickler so that the refusal can name what it would import.
The caller re-saves the loaded value: torch's own loader, which may fall back to
``weights_only=False``, only ever sees pickles written by ``torch.save`` from tensors.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Any

import torch

ZIP_MAGIC = b"PK\x03\x04"
MAX_INNER_MEMBERS = 100_000
MAX_STREAMS = 64
# what torch.save writes inside its archive; storages are data/<key>
_INNER = re.compile(r"(data\.pkl|\.format_version|\.storage_alignment|byteorder|version|"
                    r"\.data/version|\.data/serialization_id|data/[0-9]{1,12})")


class PickleRefused(Exception):
    """A pickled member that is not loaded; the message says why."""


def reserialize(name: str, data: bytes) -> Any:
    """The value of the ``torch.save`` archive ``data``, loaded weights-only, or PickleRefused."""
    if data[:4] != ZIP_MAGIC:
        what = scan_streams(data, name)
        raise PickleRefused(f"{name} is {what}, not a torch.save zip archive; torch.export.save never "
                            "writes that, and it is not read")
    inner, pkl = _rebuild_inner(name, data)
    end = _pickle_end(pkl)
    if end is None:
        raise PickleRefused(f"{name}: data.pkl is not a pickle")
    found = scan_streams(pkl, name)  # the allowlist first, for a message that names the global
    if end != len(pkl):
        raise PickleRefused(f"{name}: data.pkl holds {found}; exactly one is read")
    try:
        return torch.load(io.BytesIO(inner), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unsafe content"])[0]
        raise PickleRefused(f"{name} holds objects other than tensors and plain data: {first[:200]}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt archive raises RuntimeError, TypeError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PickleRefused(f"{name} is not a readable torch.save archive: {first[:160]}") from None


def _rebuild_inner(name: str, data: bytes) -> tuple[bytes, bytes]:
    """A stored zip holding the members zipfile sees, and the data.pkl bytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if not infos or len(infos) > MAX_INNER_MEMBERS:
                raise PickleRefused(f"{name}: a torch.save archive with {len(infos)} members")
            root = infos[0].filename.split("/", 1)[0]
            out, pkl, seen = io.BytesIO(), None, set()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as w:
                for i in infos:
                    rest = i.filename[len(root) + 1:] if i.filename.startswith(root + "/") else ""
                    if not _INNER.fullmatch(rest) or i.filename in seen:
                        raise PickleRefused(f"{name}: unexpected member {i.filename[:120]!r} in its torch.save "
                                            "archive (a nested archive?)")
                    seen.add(i.filename)
                    if i.compress_type != zipfile.ZIP_STORED or i.file_size != i.compress_size or i.flag_bits & 1:
                        # torch.save stores every record: nothing here may inflate
                        raise PickleRefused(f"{name}: member {rest!r} is compressed or encrypted; "
                                            "torch.save stores every record")
                    body = z.read(i)
                    if rest == "data.pkl":
                        pkl = body
                    w.writestr(i.filename, body)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as e:
        raise PickleRefused(f"{name} is not a readable torch.save archive: {str(e)[:160]}") from None
    if pkl is None:
        raise PickleRefused(f"{name}: a torch.save archive without data.pkl")
    return out.getvalue(), pkl


def _pickle_end(data: bytes, start: int = 0) -> int | None:
    """Where the pickle stream starting at ``start`` ends (after STOP), by parsing opcodes only;
    None if the bytes there are not a complete pickle."""
    f = io.BytesIO(data)
    f.seek(start)
    try:
        for op, _, _ in pickletools.genops(f):
            if op.name == "STOP":
                return f.tell()
    except Exception:  # noqa: BLE001 - genops raises ValueError, struct.error, ...: not a pickle
        return None
    return None


class _Probe:
    """Torch's weights-only unpickler with storage references stubbed: it runs the allowlist on a
    stream without materialising tensors."""

    def __init__(self, stream: bytes) -> None:
        from torch._weights_only_unpickler import Unpickler

        self.unpickler = Unpickler(io.BytesIO(stream), encoding="ASCII")
        self.unpickler.persistent_load = lambda pid: torch.UntypedStorage(0)  # type: ignore[method-assign]

    def refusal(self) -> str | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about protocols other than 2; we refuse or allow
                self.unpickler.load()
        except pickle.UnpicklingError as e:
            return (str(e).strip().splitlines() or ["unsafe content"])[0][:200]
        except Exception:  # noqa: BLE001 - a stub storage breaks tensor rebuilds; the globals were checked
            return None
        return None


def scan_streams(data: bytes, name: str) -> str:
    """Unpickle every pickle stream in ``data`` (back to back, as legacy torch.save writes them)
    with the weights-only unpickler; raise PickleRefused naming the first one it refuses, else
    describe what was found."""
    start, count = 0, 0
    while start < len(data) and count < MAX_STREAMS:
        end = _pickle_end(data, start)
        if end is None:
            break  # raw storage bytes, or not a pickle at all
        count += 1
        problem = _Probe(data[start:end]).refusal()
        if problem:
            raise PickleRefused(f"{name}: pickle stream {count} holds what a weights-only load refuses "
                                f"(code, not tensors): {problem.split(' Please use')[0]}")
        start = end
    if count == 0:
        return "not a pickle"
    return "one pickle stream" if count == 1 and start == len(data) else f"{count} pickle streams"
