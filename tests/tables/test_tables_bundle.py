"""An externalized bundle end to end: the same scores as the in-graph bundle from the local store,
manifest and files, and every bad input refused in one line with nothing scored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixexport.errors import BadInputError, IntegrityError
from mixexport.pipeline import BuildOptions, build
from mixexport.runtime import Runtime
from mixexport.source import load_source
from tests.cli_helpers import run_cli

TABLES = ("embed_item_table", "embed_seq_table", "embed_user_table")


@pytest.fixture(scope="module")
def ext_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny rankmixer with its three (tiny) tables out, two partitions each."""
    out = tmp_path_factory.mktemp("tables") / "rm-ext"
    build(tiny_ckpt, BuildOptions(out=out, passes=("externalize-embeddings",), bench=False, metrics=False,
                                  pass_options=("externalize-embeddings.tables=" + ",".join(TABLES),
                                                "externalize-embeddings.partitions=2")))
    return out


@pytest.fixture
def broken(ext_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(ext_bundle, dst)
    return dst


def _requests(tiny_ckpt: Path) -> list:
    source = load_source(tiny_ckpt)
    return [source.example_request(1, 64, seed=3), source.example_request(3, 20, seed=4)]


def test_manifest_lists_tables_parts_and_versions(ext_bundle: Path) -> None:
    m = json.loads((ext_bundle / "manifest.json").read_text())
    assert sorted(t["name"] for t in m["tables"]) == list(TABLES)
    for t in m["tables"]:
        assert t["partitions"] == 2 and len(t["parts"]) == 2 and sum(p["rows"] for p in t["parts"]) == t["rows"]
        for p in t["parts"]:
            assert p["file"] in m["files"] and p["ids"] in m["files"]  # every part file with its sha256
            assert p["file"] == f"tables/{t['name']}/part-{t['parts'].index(p)}-of-2.npy"
    versions = {s["tables_version"] for s in m["segments"]}
    assert len(versions) == 1 and len(versions.pop()) == 64
    assert [i["name"] for i in m["model"]["inputs"]] == ["user_cat", "item_cat", "item_dense", "seq_items"]


def test_fp32_rows_score_as_the_in_graph_bundle(ext_bundle: Path, tiny_bundle: Path, tiny_ckpt: Path) -> None:
    with Runtime.open(ext_bundle) as ext, Runtime.open(tiny_bundle) as inside:
        assert ext.tables is not None and ext.tables.store.name == "local"
        for request in _requests(tiny_ckpt):
            got, want = ext.score(request), inside.score(request)
            for k in want:
                rel = np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
                assert rel <= 1e-6, (k, rel)


def test_an_unknown_id_is_refused_and_nothing_scored(ext_bundle: Path, tiny_ckpt: Path) -> None:
    request = _requests(tiny_ckpt)[0]
    request.item["item_cat"][[2, 5], 0] = 10_000  # past the table (the spec check is skipped: the store refuses)
    with Runtime.open(ext_bundle) as rt:
        with pytest.raises(BadInputError, match=r"table 'embed_item_table': 1 of \d+ distinct ids are not in the table"):
            rt.score(request, validate=False)


def _missing(b: Path) -> str:
    (b / "tables/embed_item_table/part-1-of-2.npy").unlink()
    return "tables/embed_item_table/part-1-of-2.npy"


def _changed(b: Path) -> str:
    p = b / "tables/embed_user_table/part-0-of-2.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    return "tables/embed_user_table/part-0-of-2.npy"


def _truncated(b: Path) -> str:
    p = b / "tables/embed_seq_table/part-0-of-2.npy"
    p.write_bytes(p.read_bytes()[:-64])
    return "not a whole .npy"


def _wrong_dtype(b: Path) -> str:
    p = b / "tables/embed_seq_table/part-1-of-2.npy"
    np.save(p, np.load(p).astype(np.float64))
    return "expected float32"


def _version(b: Path) -> str:
    m = json.loads((b / "manifest.json").read_text())
    m["segments"][0]["tables_version"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(m))
    return "was built against tables_version 0000"


@pytest.mark.parametrize("damage,verify", [(_missing, True), (_changed, True), (_truncated, False),
                                           (_wrong_dtype, False), (_version, True)],
                         ids=["missing", "hash", "truncated", "dtype", "tables_version"])
def test_a_damaged_bundle_is_refused_at_open(broken: Path, damage, verify: bool) -> None:
    expect = damage(broken)
    with pytest.raises(IntegrityError, match=expect.replace(".", r"\.")) as e:
        Runtime.open(broken, verify_files=verify)
    assert "\n" not in e.value.message


def test_verify_cli_refuses_a_changed_part_in_one_line(broken: Path) -> None:
    _changed(broken)
    r = run_cli("verify", str(broken), "--no-metrics")
    assert r.code == 1 and "Traceback" not in r.err
    assert "embed_user_table/part-0-of-2.npy" in r.err


def test_triton_python_repository_carries_the_tables(ext_bundle: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    from mixexport.serving.triton import TritonOptions, write_repository

    info = write_repository(ext_bundle, TritonOptions(out=tmp_path / "repo", flavour="python"))
    copied = tmp_path / "repo" / info["model"] / "1" / "bundle"
    assert sorted(p.name for p in (copied / "tables/embed_item_table").iterdir()) == [
        "part-0-of-2.ids.npy", "part-0-of-2.npy", "part-1-of-2.ids.npy", "part-1-of-2.npy"]
    with Runtime.open(copied) as rt, Runtime.open(ext_bundle) as ref:
        request = _requests(tiny_ckpt)[1]
        np.testing.assert_array_equal(rt.score(request)["logit"], ref.score(request)["logit"])
    with pytest.raises(BadInputError, match="native flavour cannot look rows up"):
        write_repository(ext_bundle, TritonOptions(out=tmp_path / "native", flavour="native"))


def test_inspect_lists_the_tables_and_the_bytes_that_stay(tiny_ckpt: Path, ext_bundle: Path) -> None:
    r = run_cli("inspect", str(tiny_ckpt))
    assert r.code == 0, r.err
    assert "table embed_item_table [112 x 16]: 7,168 bytes, stays in the graph: smaller than min_bytes 67,108,864" in r.out
    assert "with externalize-embeddings (min_bytes 67,108,864): " in r.out and " 0 in table part files" in r.out
    r = run_cli("inspect", str(ext_bundle))
    assert "table embed_item_table [112 x 16] float32, 2 parts, for item_cat__embed_item_table" in r.out


@pytest.mark.parametrize("edit,expect", [
    (lambda t: t["parts"][0].__setitem__("file", "segments/model.onnx"), r"parts\[0\]\.file is 'segments/model.onnx', "
                                                                          "expected a file under tables/"),
    (lambda t: t["inputs"][0].__setitem__("input", ["x"]), r"inputs\[0\]\.input must be a string, found a list"),
    (lambda t: t.__setitem__("dtype", "float64"), r"dtype is 'float64', expected one of float32, float16, int8"),
])
def test_a_malformed_tables_entry_is_one_line(broken: Path, edit, expect: str) -> None:
    from mixexport.bundle import read_manifest

    m = json.loads((broken / "manifest.json").read_text())
    edit(m["tables"][0])
    (broken / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BadInputError, match=expect):
        read_manifest(broken)


@pytest.mark.parametrize("dtype,held", [("float16", "fp16"), ("int8", "w8a16")])
def test_reduced_rows_are_held_to_their_dtype_tolerances(tiny_ckpt: Path, tmp_path: Path, dtype: str,
                                                          held: str) -> None:
    """float16/int8 rows round every lookup: the build's gate uses the rows' precision, and the
    report says so; fp32 tolerances asked for by hand fail on the same bundle."""
    out = tmp_path / dtype
    build(tiny_ckpt, BuildOptions(out=out, passes=("externalize-embeddings",), bench=False, metrics=False,
                                  pass_options=("externalize-embeddings.min_bytes=0",
                                                f"externalize-embeddings.dtype={dtype}")))
    parity = json.loads((out / "reports" / "parity.json").read_text())
    assert (parity["status"], parity["precision"], parity["gate_precision"]) == ("PASS", "fp32", held)
    assert parity["max_rel"] > 1e-5  # the rows did round: fp32's tolerances could not have passed
    assert f"Held to the {held} tolerances" in (out / "reports" / "report.md").read_text()
    r = run_cli("verify", str(out), "--no-metrics", "--rtol", "1e-6", "--atol", "1e-6")
    assert r.code == 1 and "FAIL" in r.out + r.err
