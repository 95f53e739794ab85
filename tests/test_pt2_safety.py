"""A hostile ``.pt2`` runs no code and costs bounded memory: one test per attack class, each with
variants. Every payload touches a marker file; it is first shown to run under ``pickle.loads``,
then shown not to run under ``mixexport``."""

from __future__ import annotations

import io
import json
import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.source import load_source
from mixexport.testing import pt2_fuzz, pt2_mutations
from mixexport.testing.payloads import PROTOCOLS, TECHNIQUES, code_pickle, legacy_stream, torch_zip
from mixexport.testing.pt2_mutations import Member, read_members, write_members
from tests.cli_helpers import run_cli


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pt2_fuzz.make_program(tmp_path_factory.mktemp("pt2") / "base.pt2")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


def _edit(base: Path, out: Path, change) -> Path:
    members = read_members(base)
    change(members, members[0].name.split("/", 1)[0])
    out.write_bytes(write_members(members))
    return out


def _member(members: list[Member], suffix: str) -> Member:
    return next(m for m in members if m.name.endswith(suffix))


def _set_config(members: list[Member], which: str, edit) -> None:
    m = _member(members, f"data/{which}/model_{which}_config.json")
    cfg = json.loads(m.data)
    edit(cfg["config"])
    m.data = json.dumps(cfg).encode()


def _refused(path: Path, marker: Path, *needles: str) -> str:
    marker.unlink(missing_ok=True)
    with pytest.raises(BadInputError) as e:
        load_source(path)
    assert not marker.exists(), f"code ran while loading {path}"
    assert "\n" not in e.value.message
    for needle in needles:
        assert needle in e.value.message, e.value.message
    return e.value.message


def test_payloads_are_live(marker: Path) -> None:
    """Every payload the tests use really runs code under a full unpickler."""
    for technique in TECHNIQUES:
        for protocol in PROTOCOLS:
            marker.unlink(missing_ok=True)
            pickle.loads(code_pickle(marker, technique, protocol))
            assert marker.exists(), (technique, protocol)
    for position in range(1, 6):
        marker.unlink(missing_ok=True)
        f = io.BytesIO(legacy_stream(marker, "memo", 2, position))
        for _ in range(5):
            pickle.load(f)
        assert marker.exists(), position


def test_code_in_pickled_members_never_runs(base: Path, tmp_path: Path, marker: Path) -> None:
    """Every technique × protocol 0-5, as data.pkl of a torch.save zip, as a bare pickle and as any
    stream of the legacy multi-pickle format, in sample inputs, use_pickle weights and constants."""
    forms = ("zip", "bare", "legacy")
    sites = ("sample_inputs", "weight", "constant")
    k = 0
    for technique in TECHNIQUES:
        for protocol in PROTOCOLS:
            form, site = forms[k % 3], sites[(k // 3) % 3]
            k += 1
            payload = {"zip": torch_zip(code_pickle(marker, technique, protocol)),
                       "bare": code_pickle(marker, technique, protocol),
                       "legacy": legacy_stream(marker, technique, protocol, 1 + k % 5)}[form]

            def change(members: list[Member], root: str) -> None:
                if site == "sample_inputs":
                    _member(members, "data/sample_inputs/model.pt").data = payload
                elif site == "weight":
                    _set_config(members, "weights", lambda c: c["emb.weight"].update(use_pickle=True))
                    _member(members, "data/weights/" + json.loads(_member(
                        members, "model_weights_config.json").data)["config"]["emb.weight"]["path_name"]).data = payload
                else:
                    _set_config(members, "constants", lambda c: c.update(c0={
                        "path_name": "tensor_constant_0", "is_param": False, "use_pickle": True, "tensor_meta": None}))
                    members.append(Member(f"{root}/data/constants/tensor_constant_0", payload))

            path = _edit(base, tmp_path / f"{technique}-{protocol}-{form}-{site}.pt2", change)
            _refused(path, marker, "refused to load")
    r = run_cli("inspect", str(path))
    assert r.code == 2 and r.err.startswith("error: ") and "Traceback" not in r.err and not marker.exists()


@pytest.mark.parametrize("position", [1, 2, 3, 4, 5])
def test_multi_stream_pickles_are_all_unpickled_weights_only(base: Path, tmp_path: Path, marker: Path,
                                                              position: int) -> None:
    """The payload hidden in a later stream of the legacy format is named, not just the first."""
    payload = legacy_stream(marker, "binstring", 2, position)
    path = _edit(base, tmp_path / "m.pt2",
                 lambda ms, root: setattr(_member(ms, "data/sample_inputs/model.pt"), "data", payload))
    msg = _refused(path, marker)
    assert f"pickle stream {position} holds what a weights-only load refuses" in msg


@pytest.mark.parametrize("folder", ["weights", "constants"])
@pytest.mark.parametrize("content", ["benign", "code"])
def test_legacy_members_are_refused(base: Path, tmp_path: Path, marker: Path, folder: str, content: str) -> None:
    data = torch_zip(b"\x80\x02}q\x00.") if content == "benign" else torch_zip(code_pickle(marker, "global", 2))
    path = _edit(base, tmp_path / "m.pt2",
                 lambda ms, root: ms.append(Member(f"{root}/data/{folder}/model.pt", data)))
    _refused(path, marker, f"data/{folder}/model.pt", "legacy")


@pytest.mark.parametrize("prefix", ["opaque_obj_", "custom_obj_"])
@pytest.mark.parametrize("member", [True, False])
def test_opaque_and_custom_object_constants_are_refused(base: Path, tmp_path: Path, marker: Path, prefix: str,
                                                        member: bool) -> None:
    def change(members: list[Member], root: str) -> None:
        _set_config(members, "constants", lambda c: c.update(obj={
            "path_name": f"{prefix}0", "is_param": False, "use_pickle": True, "tensor_meta": None}))
        if member:
            members.append(Member(f"{root}/data/constants/{prefix}0", code_pickle(marker, "stack-global", 4)))

    _refused(_edit(base, tmp_path / "m.pt2", change), marker, prefix)
    # the member alone, named by no config, is refused too
    path = _edit(base, tmp_path / "n.pt2", lambda ms, root: ms.append(
        Member(f"{root}/data/constants/{prefix}1", code_pickle(marker, "memo", 5))))
    _refused(path, marker, "unexpected member")


@pytest.mark.parametrize("case", ["nested-in-sample-inputs", "nested-in-extra", "pickle-in-extra",
                                  "deflated-inner", "aotinductor", "executorch",
                                  "unknown-pkl", "other-model-json", "duplicate", "second-root", "dot-dot"])
def test_unknown_nested_and_duplicate_members_are_refused(base: Path, tmp_path: Path, marker: Path,
                                                          case: str) -> None:
    evil = torch_zip(code_pickle(marker, "obj", 1))

    def change(members: list[Member], root: str) -> None:
        if case == "nested-in-sample-inputs":
            _member(members, "data/sample_inputs/model.pt").data = torch_zip(
                b"\x80\x02}q\x00.", extra={"inner.pt2": evil})
        elif case == "nested-in-extra":
            members.append(Member(f"{root}/extra/inner.pt2", evil))
        elif case == "pickle-in-extra":
            members.append(Member(f"{root}/extra/state", code_pickle(marker, "global", 2)))
        elif case == "deflated-inner":
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("archive/data.pkl", pickle.dumps(((), {}), protocol=2))
            _member(members, "data/sample_inputs/model.pt").data = buf.getvalue()
        elif case == "aotinductor":
            members.append(Member(f"{root}/data/aotinductor/model/model.so", b"\x7fELF" + bytes(60)))
        elif case == "executorch":
            members.append(Member(f"{root}/data/executorch/model.pte", b"x"))
        elif case == "unknown-pkl":
            members.append(Member(f"{root}/serialized_state_dict.pkl", evil))
        elif case == "other-model-json":
            members.append(Member(f"{root}/models/other.json", b"{}"))
        elif case == "duplicate":
            members.insert(0, Member(_member(members, "sample_inputs/model.pt").name, evil))
        elif case == "second-root":
            members.append(Member("elsewhere/data/sample_inputs/model.pt", evil))
        else:
            members.append(Member(f"{root}/data/../data/weights/x", b""))

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        path = _edit(base, tmp_path / "m.pt2", change)
    _refused(path, marker, "refused to load")


@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch {m}')", "open('{m}', 'w')", "exec(\"open('{m}','w')\")",
    "Symbol('s0').__class__.__init__.__globals__", "(lambda: open('{m}', 'w'))()", "[open('{m}','w')]",
    "Integer(eval(\"open('{m}','w')\"))", "Symbol('s0', positive=True) + getattr",
    "S.__class__", "Symbol('__import__')", "Symbol(\"a\" + \"b\")",
])
def test_python_in_symbolic_shapes_never_runs(base: Path, tmp_path: Path, marker: Path, expr: str) -> None:
    """torch parses every expr_str with sympy.sympify (Python eval)."""
    evil = expr.format(m=marker)

    def change(members: list[Member], root: str) -> None:
        m = _member(members, "models/model.json")
        text = m.data.decode()
        at = text.index('"expr_str": "') + len('"expr_str": "')
        m.data = (text[:at] + json.dumps(evil + " + ")[1:-1] + text[at:]).encode()

    _refused(_edit(base, tmp_path / "m.pt2", change), marker, "symbolic expression", "refused")


@pytest.mark.parametrize("char", ["\r", "\x0b", "\x0c", "\x00", "\x1b", "\u2028", "\x85"])
def test_control_characters_in_program_strings_are_refused(base: Path, tmp_path: Path, marker: Path,
                                                           char: str) -> None:
    def change(members: list[Member], root: str) -> None:
        m = _member(members, "models/model.json")
        doc = json.loads(m.data)
        doc["graph_module"]["graph"]["nodes"][0].setdefault("metadata", {})["stack_trace"] = (
            f'File "a.py", line 1, in f\nx = 1{char}open({str(marker)!r}, "w")\n')
        m.data = json.dumps(doc).encode()

    _refused(_edit(base, tmp_path / "m.pt2", change), marker, "control character")


@pytest.mark.parametrize("name", [None, 7, "item_dense=__import__('os').system('touch {m}')",
                                  "item_dense: open('{m}', 'w')", "item_dense)\n    open('{m}', 'w')\n#",
                                  "import", "a b", ""])
def test_strings_that_become_python_code_are_refused(base: Path, tmp_path: Path, marker: Path, name) -> None:
    """torch.fx writes forward_arg_names into the source of forward(): identifiers only."""
    value = name.format(m=marker) if isinstance(name, str) else name

    def change(members: list[Member], root: str) -> None:
        m = _member(members, "models/model.json")
        doc = json.loads(m.data)
        doc["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"][1] = value
        m.data = json.dumps(doc).encode()

    msg = _refused(_edit(base, tmp_path / "m.pt2", change), marker, "forward_arg_names")
    assert "identifier" in msg or "control character" in msg


@pytest.mark.parametrize("sizes,record", [([1 << 20, 1 << 16], b""), ([1 << 40], b""), ([4096, 4096], bytes(4)),
                                          ([-1, 4], bytes(80)), ([20, "s0"], bytes(80))])
def test_weight_shapes_cannot_allocate_past_their_record(base: Path, tmp_path: Path, marker: Path, sizes,
                                                         record: bytes) -> None:
    """A raw weight's config gives its shape; an empty record would make torch allocate it whole."""
    def change(members: list[Member], root: str) -> None:
        holder = {}

        def edit(config: dict) -> None:
            meta = config["emb.weight"]["tensor_meta"]
            meta["sizes"] = [{"as_int": s} if isinstance(s, int) else {"as_expr": s} for s in sizes]
            holder["path"] = config["emb.weight"]["path_name"]

        _set_config(members, "weights", edit)
        _member(members, "data/weights/" + holder["path"]).data = record

    t = time.perf_counter()
    _refused(_edit(base, tmp_path / "m.pt2", change), marker, "model_weights_config.json")
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("declared", [None, 0, 4096, (1 << 20) - 1])
@pytest.mark.parametrize("member", ["extra/bomb", "data/weights/weight_0", "models/model.json"])
def test_zip_bombs_are_refused_before_inflating(base: Path, tmp_path: Path, marker: Path, declared: int | None,
                                                member: str) -> None:
    """A 64 MiB deflated member of zeros: with its true size (over the ratio cap) it is refused from
    the directory alone; with a smaller declared size only that many bytes are inflated."""
    path = pt2_mutations.zip_bomb(base, tmp_path / "bomb.pt2", 64 << 20, declared, member)
    t = time.perf_counter()
    msg = _refused(path, marker)
    assert time.perf_counter() - t < 5
    if declared is None:
        assert "zip bomb" in msg and "more than 100:1" in msg
    else:
        # the CRC or length check after inflating at most `declared` bytes, or (a weight declaring
        # fewer bytes than its shape needs) the payload config check, before any inflating
        assert "CRC" in msg or "declares" in msg or "expected" in msg or "tensor_meta needs" in msg, msg


def test_zip_bomb_peak_memory_is_bounded(base: Path, tmp_path: Path) -> None:
    """Measured in a fresh process with getrusage: a 256 MiB bomb (true and lying sizes) costs
    less than twice the file plus 8 MiB (the refusal comes before anything is inflated)."""
    paths = [pt2_mutations.zip_bomb(base, tmp_path / f"bomb{i}.pt2", pt2_mutations.BOMB_BYTES, declared)
             for i, declared in enumerate((None, 1 << 20, 0))]
    for peak in pt2_fuzz.peak_memory_of_loads(paths):
        assert peak["result"].startswith("refused: "), peak
        assert peak["peak_growth_bytes"] < 2 * paths[0].stat().st_size + (8 << 20), peak


@pytest.mark.parametrize("case", ["truncated", "not-zip", "encrypted-flag", "bzip2", "empty-zip", "stored-size-lie"])
def test_broken_archives_are_one_line(base: Path, tmp_path: Path, marker: Path, case: str) -> None:
    raw = base.read_bytes()
    path = tmp_path / "m.pt2"
    if case == "truncated":
        raw = raw[: len(raw) // 2]
    elif case == "not-zip":
        raw = b"PK\x03\x04" + bytes(100)
    elif case == "empty-zip":
        raw = b"PK\x05\x06" + bytes(18)
    else:
        members = read_members(base)
        raw = write_members(members)
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            offset = z.getinfo(members[0].name).header_offset  # the first member: its central entry is first
        arr = bytearray(raw)
        eocd = raw.rfind(b"PK\x05\x06")
        cd_start = int.from_bytes(raw[eocd + 16:eocd + 20], "little")
        if case == "encrypted-flag":
            arr[offset + 6] |= 1
            arr[cd_start + 8] |= 1
        elif case == "bzip2":
            arr[offset + 8] = 12
            arr[cd_start + 10] = 12
        else:  # a stored member whose declared size is larger than what it holds
            arr[cd_start + 24:cd_start + 28] = (10 ** 6).to_bytes(4, "little")
        raw = bytes(arr)
    path.write_bytes(raw)
    marker.unlink(missing_ok=True)
    r = run_cli("inspect", str(path))
    assert r.code == 2 and r.err.startswith("error: ") and "Traceback" not in r.err, r.err


@pytest.mark.parametrize("case", ["recompressed", "use-pickle-weight", "renamed-root"])
def test_legitimate_variants_still_load(base: Path, tmp_path: Path, case: str) -> None:
    """What torch writes, re-zipped with deflate, or with a weight stored as a pickle, still loads,
    with the same weights."""
    mutator = pt2_mutations.Mutator(read_members(base), tmp_path / "MARKER")
    if case == "recompressed":
        _, raw = mutator.mutate(0, 0, "recompress")
    elif case == "use-pickle-weight":
        _, raw = mutator.mutate(0, 1, "use-pickle")
    else:
        members = read_members(base)
        for m in members:
            m.name = "my model" + m.name[len("base"):]
        raw = write_members(members)
    path = tmp_path / "ok.pt2"
    path.write_bytes(raw)
    source = load_source(path)
    reference = load_source(base)
    feeds = reference.example_feeds(3)
    ref, got = reference.reference(feeds), source.reference(feeds)
    assert all(torch.equal(torch.from_numpy(ref[k]), torch.from_numpy(got[k])) for k in ref)


def test_fuzz_slice(base: Path, tmp_path: Path, marker: Path) -> None:
    """A CI-sized slice of scripts/fuzz_pt2.py: every mutation kind, no traceback, no code run."""
    report = pt2_fuzz.fuzz(base, tmp_path, marker, mutations=len(pt2_mutations.KINDS) * 4, seed=7,
                           cli_every=50, kinds=pt2_mutations.KINDS)
    assert not report.failures, report.failures[:3]
    counts = report.counts()
    assert counts.get("refused", 0) > 0 and counts.get("loaded", 0) > 0, counts
