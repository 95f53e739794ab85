"""The id → (partition, row) rule, row encodings, and the streaming writer read back by the local store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mixexport.errors import BadInputError
from mixexport.specs import TensorSpec
from mixexport.tables.layout import (TableEntry, TableUse, decode_rows, encode_rows, partition_of, splitmix64,
                                     table_version)
from mixexport.tables.stores.local import LocalStore
from mixexport.tables.writer import TableData, write_table


def test_splitmix64_matches_the_reference_sequence() -> None:
    # the first output of Vigna's splitmix64 seeded with 0 is mix(0 + golden gamma)
    assert int(splitmix64(np.array([0]))[0]) == 0xE220A8397B1DCDAF
    p = partition_of(np.arange(10_000), 8)
    assert p.min() == 0 and p.max() == 7 and np.bincount(p).min() > 1_100  # spread evenly


@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("int8", 1 / 127)])
def test_row_encodings_round_trip_within_their_precision(dtype: str, tol: float) -> None:
    rows = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    rows[3] = 0.0  # an all-zero row keeps scale 1 (no division by zero)
    stored, scale = encode_rows(rows, dtype)
    back = decode_rows(stored, scale, "float32")
    assert stored.dtype == np.dtype(dtype) and (scale is not None) == (dtype == "int8")
    rel = np.abs(back - rows).max(axis=1) / np.maximum(np.abs(rows).max(axis=1), 1e-12)
    assert rel.max() <= tol * 0.51 + 1e-7 and not back[3].any()


def _entry(rows: int, dim: int, dtype: str, parts: int) -> TableEntry:
    use = TableUse("ids", None, (0,), TensorSpec("ids__t", "float32", ("batch", dim), "item"))
    return TableEntry("t", rows, dim, dtype, "float32", parts, None, (use,))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_writer_streams_partitions_the_store_reads_back(tmp_path: Path, dtype: str) -> None:
    weight = torch.randn(1000, 8)
    # a 4 KiB chunk: 128 rows at a time, so every partition is appended to across many chunks
    entry, digests = write_table(TableData(_entry(1000, 8, dtype, 3), weight), tmp_path, chunk_bytes=4096)
    assert [p["rows"] for p in entry.parts] == np.bincount(partition_of(np.arange(1000), 3)).tolist()
    assert sorted(digests) == sorted(entry.files()) and entry.version == table_version(entry, digests)
    for k, p in enumerate(entry.parts):
        ids = np.load(tmp_path / p["ids"])
        assert (np.diff(ids) > 0).all() and (partition_of(ids, 3) == k).all()  # the rule, ordered by id
    store = LocalStore(tmp_path, (entry,))
    ids = np.array([0, 999, 5, 17, 640], dtype=np.int64)
    got = store.lookup("t", ids)
    want = weight[torch.from_numpy(ids)].numpy()
    if dtype == "float32":
        np.testing.assert_array_equal(got, want)
    else:
        assert np.abs(got - want).max() <= np.abs(want).max() / 127
    with pytest.raises(BadInputError, match=r"table 't': 2 of 3 distinct ids are not in the table"):
        store.lookup("t", np.array([1, 1000, -1], dtype=np.int64))
