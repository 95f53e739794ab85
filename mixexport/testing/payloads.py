"""Pickles that run code, written opcode by opcode, for the ``.pt2`` tests and fuzzer.

Each payload runs ``touch MARKER`` when a full unpickler (``pickle.loads``) reads it, so a test
proves both that the payload is live and that mixexport never ran it. The ways of naming the
callable are the ones a static scan of opcodes misses or a loader treats differently:

``global``: ``GLOBAL posix system`` then ``REDUCE`` · ``stack-global``: two ``SHORT_BINUNICODE``
then ``STACK_GLOBAL`` · ``binstring``: the names pushed as ``SHORT_BINSTRING`` (byte strings) ·
``memo``: the names stored in the memo and fetched back (``BINGET``/``GET``) before
``STACK_GLOBAL`` · ``inst``: protocol 0's ``INST`` · ``obj``: protocol 1's ``OBJ`` ·
``builtins-exec``: ``builtins.exec`` of Python source instead of ``os.system``.

Every technique comes in pickle protocols 0 to 5 (the ``PROTO`` header; protocol 0 and 1 have
none, text opcodes are used where the binary ones do not exist).
"""

from __future__ import annotations

import struct
from pathlib import Path

TECHNIQUES = ("global", "stack-global", "binstring", "memo", "inst", "obj", "builtins-exec")
PROTOCOLS = (0, 1, 2, 3, 4, 5)
# torch.save's legacy stream format opens with these three pickles (magic number, protocol, sys info)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _header(protocol: int) -> bytes:
    return b"\x80" + bytes([protocol]) if protocol >= 2 else b""


def _str(s: str, protocol: int) -> bytes:
    raw = s.encode()
    if protocol == 0:
        return b"V" + raw + b"\n"  # UNICODE (raw-unicode-escape; the payloads hold plain ASCII)
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _binstring(s: str) -> bytes:
    raw = s.encode()
    return b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING: decoded as ASCII str by pickle.loads


def code_pickle(marker: Path, technique: str, protocol: int) -> bytes:
    """A pickle that runs ``touch marker`` (or writes it, for ``builtins-exec``) when unpickled."""
    cmd = f"touch {marker}"
    arg = b"(" + _str(cmd, protocol) + b"t"  # MARK, the command, TUPLE
    if technique == "global":
        body = b"cposix\nsystem\n" + arg + b"R"
    elif technique == "stack-global":
        body = b"\x8c\x05posix\x8c\x06system\x93" + arg + b"R"
    elif technique == "binstring":
        body = _binstring("posix") + _binstring("system") + b"\x93" + arg + b"R"
    elif technique == "memo":
        if protocol >= 1:  # BINPUT/POP, then BINGET the names back
            body = (_str("posix", protocol) + b"q\x07" + b"0" + _str("system", protocol) + b"q\x08" + b"0"
                    + b"h\x07h\x08\x93" + arg + b"R")
        else:  # PUT/GET, the protocol-0 text forms
            body = (_str("posix", 0) + b"p7\n0" + _str("system", 0) + b"p8\n0" + b"g7\ng8\n\x93" + arg + b"R")
    elif technique == "inst":
        body = b"(" + _str(cmd, protocol) + b"iposix\nsystem\n"
    elif technique == "obj":
        body = b"(cposix\nsystem\n" + _str(cmd, protocol) + b"o"
    elif technique == "builtins-exec":
        src = f"open({str(marker)!r}, 'w').close()"
        body = b"cbuiltins\nexec\n(" + _str(src, protocol) + b"tR"
    else:
        raise ValueError(f"unknown technique {technique!r}; known: {TECHNIQUES}")
    return _header(protocol) + body + b"."


def plain_pickle(value: object, protocol: int) -> bytes:
    """A harmless pickle (``pickle.dumps``) to put before a payload in a stream."""
    import pickle

    return pickle.dumps(value, protocol=protocol)


def legacy_stream(marker: Path, technique: str, protocol: int, position: int) -> bytes:
    """torch.save's legacy format: several pickles back to back. The payload is stream number
    ``position`` (1-based, 1 to 5); the others are what torch writes there."""
    import sys

    streams = [plain_pickle(LEGACY_MAGIC, 2), plain_pickle(1001, 2),
               plain_pickle({"protocol_version": 1001, "little_endian": sys.byteorder == "little",
                             "type_sizes": {"short": 2, "int": 4, "long": 4}}, 2),
               plain_pickle({}, 2), plain_pickle([], 2)]
    streams[position - 1] = code_pickle(marker, technique, protocol)
    return b"".join(streams)


def torch_zip(data_pkl: bytes, root: str = "archive", extra: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-shaped zip archive whose ``data.pkl`` is ``data_pkl``."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{root}/data.pkl", data_pkl)
        z.writestr(f"{root}/byteorder", b"little")
        z.writestr(f"{root}/version", b"3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"{root}/{name}", data)
    return buf.getvalue()
