"""Labelled Parquet rows consistent with a bundle's input specs, for tests and benchmarks
(``benchmarks/make_eval_parquet.py``).

- A bundle whose model was trained on MovieLens-100k gets MovieLens-shaped rows: the test split's
  real (user, item) rows, one user's rows consecutive, cycled (with fresh user keys per cycle)
  until ``rows`` are written.
- Any other bundle gets random rows: per user, random user-side inputs within the vocabularies
  and a random number of candidates with random item inputs; labels are Bernoulli(0.3).

The concrete length of a symbolic axis (``seq``) is taken from the bundle's sample request.
Rows are split over ``files`` files at user boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixexport.specs import Request, TensorSpec, random_ids

#: user_key column written with every row (rows of one user share it)
KEY = "user_key"


def _table(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], label: np.ndarray, key: np.ndarray) -> Any:
    import pyarrow as pa

    cols: dict[str, Any] = {KEY: pa.array(key, pa.int64())}
    for s in specs:
        v = np.ascontiguousarray(feeds[s.name])
        if v.ndim == 1:
            cols[s.name] = pa.array(v)
        else:
            width = int(np.prod(v.shape[1:]))
            cols[s.name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), width)
    cols["label"] = pa.array(label.astype(np.float32))
    return pa.table(cols)


def _random_chunks(specs: tuple[TensorSpec, ...], sample: Request, rows: int, seed: int,
                   candidates: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    user_id, done = 0, 0
    shapes = {**{k: v.shape[1:] for k, v in sample.user.items()}, **{k: v.shape[1:] for k, v in sample.item.items()}}
    while done < rows:
        users = 1024
        counts = rng.integers(1, 2 * candidates, size=users)
        counts = counts[: int(np.searchsorted(np.cumsum(counts), rows - done)) + 1]
        counts[-1] -= max(0, int(counts.sum()) - (rows - done))
        n, u = int(counts.sum()), len(counts)
        index = np.repeat(np.arange(u), counts)
        feeds = {}
        for s in specs:
            lead = u if s.user_side else n
            shape = (lead, *shapes[s.name])
            if s.vocab is not None or np.dtype(s.dtype).kind in "iu":
                v = random_ids(s, shape, rng)
            else:
                v = (rng.random(shape) < 0.2).astype(s.dtype)
            feeds[s.name] = v[index] if s.user_side else v
        yield feeds, (rng.random(n) < 0.3).astype(np.float32), user_id + index
        user_id += u
        done += n


def _movielens_chunks(specs: tuple[TensorSpec, ...], sample: Request, rows: int
                      ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    from mixexport.data import movielens_100k

    seq = sample.user.get("seq_items")
    beh = sample.user.get("seq_behaviours")
    ds = movielens_100k(seq_len=seq.shape[1] if seq is not None else 32,
                        behaviour_len=beh.shape[2] if beh is not None else 0)
    test = ds.test
    order = np.argsort(test.user_key, kind="stable")  # one user's rows consecutive
    cycle, done = 0, 0
    while done < rows:
        take = order[: rows - done]
        feeds = {s.name: test.feeds[s.name][take] for s in specs}
        yield feeds, test.label[take], test.user_key[take].astype(np.int64) + cycle * 10**6
        cycle += 1
        done += len(take)


def write_eval_parquet(bundle: str | Path, out: str | Path, rows: int, files: int = 1, seed: int = 0,
                       candidates: int = 16) -> list[Path]:
    """Write ``rows`` rows for ``bundle`` into ``files`` Parquet files under ``out``; returns them."""
    import pyarrow.parquet as pq

    from mixexport.bundle import read_manifest

    manifest = read_manifest(bundle)
    specs = manifest.inputs
    sample = Request.from_npz_dict(dict(np.load(manifest.file("inputs/sample.npz"), allow_pickle=False)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    movielens = (manifest.source.get("metadata") or {}).get("dataset") == "movielens-100k"
    chunks = _movielens_chunks(specs, sample, rows) if movielens else _random_chunks(specs, sample, rows, seed, candidates)
    per_file = -(-rows // files)
    paths, writer, written, index = [], None, 0, 0
    for feeds, label, key in chunks:
        table = _table(feeds, specs, label, key)
        while table.num_rows:
            if writer is None:
                paths.append(out / f"part-{index:05d}.parquet")
                writer = pq.ParquetWriter(paths[-1], table.schema)
            room = per_file * (index + 1) - written
            cut = _user_boundary(table.column(KEY).to_numpy(), room) if index < files - 1 else table.num_rows
            writer.write_table(table.slice(0, cut))
            written += cut
            table = table.slice(cut)
            if table.num_rows or (index < files - 1 and written >= per_file * (index + 1)):
                writer.close()
                writer, index = None, index + 1
    if writer is not None:
        writer.close()
    return paths


def _user_boundary(keys: np.ndarray, room: int) -> int:
    """The largest cut <= room rows (at least one user) that does not split a user's rows."""
    if room >= len(keys):
        return len(keys)
    cut = max(room, 1)
    while cut < len(keys) and keys[cut] == keys[cut - 1]:
        cut += 1
    return cut
