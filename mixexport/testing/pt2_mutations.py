"""``.pt2`` archive mutations for :mod:`mixexport.testing.pt2_fuzz`: a real ``torch.export.save``
archive read as its zip members, changed one way (:data:`KINDS`), written back.

A ``.pt2`` is untrusted input, so every mutation must end in a clean load or a one-line
:class:`~mixexport.errors.BadInputError`; never another exception (a traceback), a hang, or code
running: every payload touches a marker file, which is checked after each mutation.
Mutations (:data:`KINDS`):

``code-sample-inputs`` / ``code-weight`` / ``code-constant``: a pickled member (or a weight or
constant switched to ``use_pickle``) replaced by a code-running pickle (every technique of
:mod:`mixexport.testing.payloads`, protocols 0-5) as ``data.pkl`` of a torch.save zip, as a bare
pickle, or in the legacy multi-pickle stream at any position · ``legacy-member``
(``data/weights/<model>.pt``, ``data/constants/<model>.pt``) · ``opaque-constant``
(``opaque_obj_*``/``custom_obj_*``) · ``nested-archive`` · ``aoti`` (a native library) ·
``expr`` (Python in a symbolic shape) · ``control-char`` (``\\r`` in a program string) ·
``add`` / ``rename`` / ``drop`` / ``duplicate`` a member · ``recompress`` (deflate, levels 1-9)
· ``bomb`` (a deflated member of zeros, its size declared or lied about) · ``truncate`` ·
``bitflip`` · ``json`` (a value of a config or the program changed) · ``use-pickle`` (a weight
stored as a legitimate torch.save pickle: must still load).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixexport.testing.payloads import PROTOCOLS, TECHNIQUES, code_pickle, legacy_stream, torch_zip

KINDS = ("code-sample-inputs", "code-weight", "code-constant", "legacy-member", "opaque-constant",
         "nested-archive", "aoti", "expr", "control-char", "add", "rename", "drop", "duplicate", "recompress",
         "bomb", "truncate", "bitflip", "json", "use-pickle")
BOMB_BYTES = 256 << 20  # a zip bomb member inflates to this much

@dataclass
class Member:
    name: str
    data: bytes
    compress: int = zipfile.ZIP_STORED
    level: int | None = None



def read_members(path: Path) -> list[Member]:
    with zipfile.ZipFile(path) as z:
        return [Member(i.filename, z.read(i)) for i in z.infolist()]


def write_members(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for m in members:
            z.writestr(zipfile.ZipInfo(m.name, (2020, 1, 1, 0, 0, 0)), m.data, compress_type=m.compress,
                       compresslevel=m.level)
    return buf.getvalue()


class Mutator:
    """Mutation ``k`` of a seed is the same on every machine (a Random seeded by (seed, k))."""

    def __init__(self, base: list[Member], marker: Path) -> None:
        self.base = base
        self.marker = marker
        self.root = base[0].name.split("/", 1)[0]

    def mutate(self, seed: int, index: int, kind: str | None = None) -> tuple[str, bytes]:
        rng = random.Random(f"{seed}:{index}")
        kind = kind or rng.choice(KINDS)
        members = [Member(m.name, m.data) for m in self.base]
        raw = getattr(self, "_" + kind.replace("-", "_"))(rng, members)
        return kind, raw if isinstance(raw, bytes) else write_members(members)

    # --- helpers --------------------------------------------------------------------------------
    def _find(self, members: list[Member], suffix: str) -> Member:
        return next(m for m in members if m.name.endswith(suffix))

    def _payload(self, rng: random.Random) -> bytes:
        technique, protocol = rng.choice(TECHNIQUES), rng.choice(PROTOCOLS)
        form = rng.choice(("zip", "bare", "legacy"))
        if form == "zip":
            return torch_zip(code_pickle(self.marker, technique, protocol))
        if form == "bare":
            return code_pickle(self.marker, technique, protocol)
        return legacy_stream(self.marker, technique, protocol, rng.randint(1, 5))

    def _config(self, members: list[Member], which: str) -> tuple[Member, dict[str, Any]]:
        m = self._find(members, f"data/{which}/model_{which}_config.json")
        return m, json.loads(m.data)

    # --- mutations ------------------------------------------------------------------------------
    def _code_sample_inputs(self, rng: random.Random, members: list[Member]) -> None:
        self._find(members, "data/sample_inputs/model.pt").data = self._payload(rng)

    def _code_weight(self, rng: random.Random, members: list[Member]) -> None:
        m, cfg = self._config(members, "weights")
        entry = rng.choice(list(cfg["config"].values()))
        entry["use_pickle"] = True
        m.data = json.dumps(cfg).encode()
        self._find(members, f"data/weights/{entry['path_name']}").data = self._payload(rng)

    def _code_constant(self, rng: random.Random, members: list[Member]) -> None:
        m, cfg = self._config(members, "constants")
        cfg["config"]["lifted_tensor_0"] = {"path_name": "tensor_constant_0", "is_param": False,
                                            "use_pickle": True, "tensor_meta": None}
        m.data = json.dumps(cfg).encode()
        members.append(Member(f"{self.root}/data/constants/tensor_constant_0", self._payload(rng)))

    def _legacy_member(self, rng: random.Random, members: list[Member]) -> None:
        folder = rng.choice(("weights", "constants"))
        data = self._payload(rng) if rng.random() < 0.7 else torch_zip(b"\x80\x02}q\x00.")
        members.append(Member(f"{self.root}/data/{folder}/model.pt", data))

    def _opaque_constant(self, rng: random.Random, members: list[Member]) -> None:
        m, cfg = self._config(members, "constants")
        prefix = rng.choice(("opaque_obj_", "custom_obj_"))
        cfg["config"]["obj"] = {"path_name": f"{prefix}0", "is_param": False, "use_pickle": True,
                                "tensor_meta": None}
        m.data = json.dumps(cfg).encode()
        members.append(Member(f"{self.root}/data/constants/{prefix}0", self._payload(rng)))

    def _nested_archive(self, rng: random.Random, members: list[Member]) -> None:
        inner = torch_zip(b"\x80\x02}q\x00.", extra={rng.choice(("nested.pt2", "data/0", "x/data.pkl")):
                                                      torch_zip(code_pickle(self.marker, "global", 2))})
        target = rng.choice(("data/sample_inputs/model.pt", "extra/nested.pt2"))
        if target.startswith("extra"):
            members.append(Member(f"{self.root}/{target}", inner))
        else:
            self._find(members, target).data = inner

    def _aoti(self, rng: random.Random, members: list[Member]) -> None:
        name = rng.choice(("data/aotinductor/model/model.so", "data/aotinductor/model/model.wrapper.cpp",
                           "data/executorch/model.pte", "data/mtia/x"))
        members.append(Member(f"{self.root}/{name}", b"\x7fELF" + bytes(64)))

    def _expr(self, rng: random.Random, members: list[Member]) -> None:
        m = self._find(members, "models/model.json")
        evil = rng.choice((f"__import__('os').system('touch {self.marker}')",
                           f"open('{self.marker}', 'w')", "Symbol.__class__", "[].__class__",
                           f"lambda: __import__('os').system('touch {self.marker}')",
                           "Integer(1).__reduce__()", "(" * 500 + "1" + ")" * 500,
                           f"exec(\"open('{self.marker}','w')\")"))
        text = m.data.decode()
        at = text.find('"expr_str": "')
        if at >= 0:
            at += len('"expr_str": "')
            text = text[:at] + json.dumps(evil + " + ")[1:-1] + text[at:]
        m.data = text.encode()

    def _control_char(self, rng: random.Random, members: list[Member]) -> None:
        m = self._find(members, "models/model.json")
        doc = json.loads(m.data)
        strings: list[tuple[Any, Any]] = []

        def walk(v: Any) -> None:
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()):
                if isinstance(x, str):
                    strings.append((v, k))
                else:
                    walk(x)
        walk(doc)
        container, key = rng.choice(strings)
        container[key] = container[key] + rng.choice(("\r", "\x0b", "\x0c", "\u2028", "\x00")) + "x = 1"
        m.data = json.dumps(doc).encode()

    def _add(self, rng: random.Random, members: list[Member]) -> None:
        name = rng.choice(("data/weights/weight_99", "data/extra.pkl", "models/other.json", "serialized.pkl",
                           "data/sample_inputs/other.pt", "extra/notes", "version", "data/constants/x.pt"))
        data = rng.choice((self._payload(rng), b"hello", json.dumps({"config": {}}).encode(), bytes(16)))
        members.append(Member(f"{self.root}/{name}", data))

    def _rename(self, rng: random.Random, members: list[Member]) -> None:
        m = rng.choice(members)
        new = rng.choice(("../escape", "/abs", "other/" + m.name.split("/", 1)[1], m.name + ".bak",
                          m.name.replace("model", "modèle"), m.name.upper(), self.root + "/", m.name + "\\x"))
        m.name = new

    def _drop(self, rng: random.Random, members: list[Member]) -> None:
        members.pop(rng.randrange(len(members)))

    def _duplicate(self, rng: random.Random, members: list[Member]) -> bytes:
        m = rng.choice(members)
        dup = Member(m.name, self._payload(rng) if rng.random() < 0.5 else m.data)
        members.insert(rng.choice((0, len(members))), dup)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
            return write_members(members)

    def _recompress(self, rng: random.Random, members: list[Member]) -> None:
        for m in members:
            if rng.random() < 0.7:
                m.compress, m.level = zipfile.ZIP_DEFLATED, rng.randint(1, 9)

    def _bomb(self, rng: random.Random, members: list[Member]) -> bytes:
        name = rng.choice((f"{self.root}/extra/bomb", f"{self.root}/data/weights/weight_0",
                           f"{self.root}/models/model.json"))
        members = [m for m in members if m.name != name]
        raw = write_members(members)
        lie = rng.choice((None, 0, 100, 4096))
        return _append_deflated(raw, name, _zeros_deflated(), BOMB_BYTES, lie)

    def _truncate(self, rng: random.Random, members: list[Member]) -> bytes:
        raw = write_members(members)
        return raw[:rng.randrange(len(raw))]

    def _bitflip(self, rng: random.Random, members: list[Member]) -> bytes:
        raw = bytearray(write_members(members))
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)

    def _json(self, rng: random.Random, members: list[Member]) -> None:
        m = rng.choice([m for m in members if m.name.endswith(".json")])
        doc = json.loads(m.data)
        nodes: list[tuple[Any, Any]] = []

        def walk(v: Any, depth: int = 0) -> None:
            for k, x in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()):
                nodes.append((v, k))
                if depth < 8:
                    walk(x, depth + 1)
        walk(doc)
        if nodes:
            container, key = rng.choice(nodes)
            container[key] = rng.choice((None, -1, 2**63, "x", [], {}, True, 1e308, "../../x", "s0" * 1000))
        m.data = json.dumps(doc).encode()

    def _use_pickle(self, rng: random.Random, members: list[Member]) -> None:
        import torch

        m, cfg = self._config(members, "weights")
        entry = rng.choice(list(cfg["config"].values()))
        w = self._find(members, f"data/weights/{entry['path_name']}")
        from torch._export.serde.serialize import deserialize_scalar_type

        meta = entry["tensor_meta"]
        dtype = deserialize_scalar_type(meta["dtype"])
        sizes = [s["as_int"] for s in meta["sizes"]]
        tensor = torch.frombuffer(bytearray(w.data), dtype=dtype).reshape(sizes).clone()
        value = torch.nn.Parameter(tensor, requires_grad=meta["requires_grad"]) if entry["is_param"] else tensor
        buf = io.BytesIO()
        torch.save(value, buf)
        entry["use_pickle"] = True
        m.data = json.dumps(cfg).encode()
        w.data = buf.getvalue()


_ZEROS: bytes | None = None


def _zeros_deflated() -> bytes:
    """BOMB_BYTES of zeros, raw-deflated (about 250 KB), built once."""
    global _ZEROS
    if _ZEROS is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        chunk = bytes(1 << 20)
        _ZEROS = b"".join(c.compress(chunk) for _ in range(BOMB_BYTES >> 20)) + c.flush()
    return _ZEROS


def _append_deflated(raw: bytes, name: str, deflated: bytes, size: int, declared: int | None) -> bytes:
    """``raw`` (a zip) with one more deflated member whose headers declare ``declared`` bytes
    (its true ``size`` when None); the CRC is the true one."""
    import binascii

    crc = 0
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        crc = binascii.crc32(chunk, crc)
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos = z.infolist()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_size, cd_start = struct.unpack("<2L", raw[eocd + 12:eocd + 20])
    head = raw[:cd_start]
    central = raw[cd_start:cd_start + cd_size]
    usize = size if declared is None else declared
    fname = name.encode()
    offset = len(head)
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(deflated), usize,
                        len(fname), 0) + fname
    entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(deflated), usize,
                        len(fname), 0, 0, 0, 0, 0, offset) + fname
    new_central = central + entry
    cd_offset = offset + len(local) + len(deflated)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(infos) + 1, len(infos) + 1, len(new_central),
                      cd_offset, 0)
    return head + local + deflated + new_central + end


def zip_bomb(base: Path, out: Path, inflated: int, declared: int | None, member: str = "extra/bomb") -> Path:
    """``base`` plus one deflated member of ``inflated`` zeros (a multiple of 1 MiB) whose headers
    declare ``declared`` bytes (the truth when None)."""
    members = read_members(base)
    root = members[0].name.split("/", 1)[0]
    if inflated == BOMB_BYTES:
        deflated = _zeros_deflated()
    else:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        chunk = bytes(1 << 20)
        deflated = b"".join(c.compress(chunk) for _ in range(inflated >> 20)) + c.flush()
    name = f"{root}/{member}"
    out.write_bytes(_append_deflated(write_members([m for m in members if m.name != name]), name, deflated,
                                     inflated, declared))
    return out
