"""verify / score on Parquet with the local engine: the report's bytes do not depend on the files or
batch sizes; bad input is one line naming the file and the column, and no report is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixexport.errors import BadInputError
from mixexport.scale.run import dumps, verify_dataset
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.xdist_group("scale")


def test_report_bytes_do_not_depend_on_files_or_batches(split_bundle: Path, eval_rows: dict[str, Path],
                                                        local_report: str) -> None:
    report = json.loads(local_report)
    assert report["rows"] == 1500 and report["tensor"]["logit"]["passed"]
    auc = report["metrics"]["auc"]
    assert auc["eager_bound"] <= 1e-6 and auc["bundle_bound"] <= 1e-6  # refined below the target
    assert report["ranking"]["requests_scored"] > 50
    other, _ = verify_dataset(split_bundle, str(eval_rows["three"]), batch_rows=97)
    assert dumps(other) == local_report


def test_score_writes_one_file_per_input(split_bundle: Path, eval_rows: dict[str, Path], tmp_path: Path) -> None:
    from mixexport.runtime import Runtime

    out = tmp_path / "scores"
    res = run_cli("score", str(split_bundle), "--data", str(eval_rows["three"]), "--out", str(out),
                  "--key", "user_key", "--batch-rows", "128")
    assert res.code == 0, res.err
    inputs = sorted(eval_rows["three"].glob("*.parquet"))
    assert sorted(p.name for p in out.glob("*.parquet")) == [p.name for p in inputs]
    table = pq.read_table(out / inputs[1].name)
    src = pq.read_table(inputs[1])
    assert table.column_names == ["row", "user_key", "label", "logit"]
    assert table.column("row").to_pylist() == list(range(src.num_rows))
    assert table.column("user_key").equals(src.column("user_key"))
    # the first user's rows, scored directly as one request
    keys = src.column("user_key").to_numpy()
    n = int(np.argmax(keys != keys[0]))
    with Runtime.open(split_bundle) as rt:
        from mixexport.specs import Request

        spec = {s.name: s for s in rt.inputs}
        feeds = {k: np.stack(src.column(k).to_pylist()[:n]).astype(spec[k].dtype) for k in spec}
        req = Request.single_user({k: v[:1] for k, v in feeds.items() if spec[k].user_side},
                                  {k: v for k, v in feeds.items() if not spec[k].user_side})
        want = rt.score(req)["logit"].reshape(-1)
    np.testing.assert_allclose(table.column("logit").to_numpy()[:n], want, rtol=1e-6, atol=1e-6)
    again = run_cli("score", str(split_bundle), "--data", str(eval_rows["three"]), "--out", str(out))
    assert again.code == 2 and "already exists" in again.err
    inside = run_cli("score", str(split_bundle), "--data", str(eval_rows["three"]),
                     "--out", str(eval_rows["three"] / "scores"))
    assert inside.code == 2 and "lies inside the input" in inside.err


def _broken(src: Path, dst: Path, change) -> Path:
    dst.mkdir()
    table = pq.read_table(next(src.glob("*.parquet")))
    path = dst / "bad.parquet"
    out = change(table)
    if isinstance(out, bytes):
        path.write_bytes(out)
    else:
        pq.write_table(out, path)
    return path


def _relabel(table: pa.Table, values: np.ndarray) -> pa.Table:
    return table.set_column(table.column_names.index("label"), "label", pa.array(values.astype(np.float32)))


CASES = {
    "missing column": (lambda t: t.drop_columns(["item_cat"]), "column 'item_cat' is missing"),
    "wrong dtype": (lambda t: t.set_column(t.column_names.index("item_dense"), "item_dense",
                                           pa.array(t.column("item_dense").to_pylist(), pa.list_(pa.float64(), 19))),
                    "column 'item_dense' holds double, expected float"),
    "wrong list length": (lambda t: t.set_column(t.column_names.index("user_cat"), "user_cat",
                                                 pa.array([r[:4] for r in t.column("user_cat").to_pylist()],
                                                          pa.list_(pa.int64(), 4))),
                          "column 'user_cat' has lists of 4 values, expected 5"),
    "NaN label": (lambda t: _relabel(t, np.where(np.arange(t.num_rows) == 7, np.nan, 0)), "label column 'label' holds NaN"),
    "non-binary label": (lambda t: _relabel(t, np.full(t.num_rows, 4.0)), "expected 0 or 1"),
    "empty file": (lambda t: t.slice(0, 0), "the file has no rows"),
    "unreadable file": (lambda t: b"PAR1 this is not parquet", "not a readable Parquet file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_file_and_column(case: str, split_bundle: Path, eval_rows: dict[str, Path],
                                                      tmp_path: Path) -> None:
    change, message = CASES[case]
    path = _broken(eval_rows["one"], tmp_path / "data", change)
    report = tmp_path / "report.json"
    res = run_cli("verify", str(split_bundle), "--data", str(path.parent), "--report", str(report))
    assert res.code == 2, res.err
    line = res.err.strip().splitlines()[-2 if "hint:" in res.err else -1]
    assert line.startswith("error: ") and str(path) in line and message in line, res.err
    assert "Traceback" not in res.err and not report.exists()


def test_file_deleted_during_the_run(split_bundle: Path, eval_rows: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for p in eval_rows["three"].glob("*.parquet"):
        (data / p.name).write_bytes(p.read_bytes())
    victim = sorted(data.glob("*.parquet"))[-1]

    def progress(message: str) -> None:
        if message.startswith("scoring"):  # after the footers were checked, before the last file is read
            victim.unlink()

    with pytest.raises(BadInputError, match=f"{victim}: the file disappeared during the run"):
        verify_dataset(split_bundle, str(data), progress=progress)


def test_a_footer_is_read_once_per_version_of_its_file(tmp_path: Path) -> None:
    """The driver's footer reads are cached (checks, then the ray engine's pieces), keyed by the
    file's mtime and size: a file rewritten between two runs is read again."""
    from mixexport.scale.files import footer

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": np.arange(10)}), path, row_group_size=5)
    first = footer(str(path))
    assert footer(str(path)) is first and first.num_row_groups == 2
    pq.write_table(pa.table({"x": np.arange(30)}), path, row_group_size=5)
    assert footer(str(path)).num_rows == 30
