"""The table-store protocol and the request expansion the runtime calls.

A :class:`TableStore` answers ``lookup(table, ids) -> rows`` for distinct ids. The runtime never
talks to it directly: it calls :meth:`TableLookups.expand`, which turns a request of ids into the
same request plus one float input per replaced lookup (``<id input>__<table>``), as the dense
segments expect. Per request and table, the ids of every input the table serves (users and
candidates alike) are deduplicated (``np.unique``), each distinct id is looked up once and the rows
are gathered back with numpy — no Python loop per row.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from mixexport.errors import BadInputError, IntegrityError
from mixexport.specs import Request
from mixexport.tables.layout import TableEntry, tables_version


class TableStore(Protocol):
    """Where rows come from. ``lookup`` takes distinct int64 ids and returns ``[len(ids), dim]``
    rows in the table's graph dtype, or raises :class:`BadInputError` naming the table and the
    number of ids it does not hold (nothing is looked up then)."""

    name: str

    def lookup(self, table: str, ids: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


def check_ids(table: TableEntry, ids: np.ndarray) -> None:
    """Refuse ids outside ``[0, rows)``: one line naming the table and how many."""
    bad = (ids < 0) | (ids >= table.rows)
    if bad.any():
        raise BadInputError(f"table {table.name!r}: {int(bad.sum())} of {ids.size} distinct ids are not in the table "
                            f"(expected 0 <= id < {table.rows}, e.g. {int(ids[bad][0])}); nothing was scored",
                            "map unknown ids to a valid id (e.g. 0) before scoring")


def check_version(entries: tuple[TableEntry, ...], segments: list[dict[str, object]]) -> str:
    """The bundle's ``tables_version``, after checking that every dense segment recorded it."""
    version = tables_version(entries)
    for seg in segments:
        got = seg.get("tables_version")
        if got != version:
            raise IntegrityError(f"segment {seg.get('name')!r} was built against tables_version {str(got)[:16]}…, "
                                 f"the bundle's tables are {version[:16]}…; refusing to score with other tables",
                                 "rebuild the bundle, or publish the tables it was built with")
    return version


class TableLookups:
    """The bundle's tables over one store: what :class:`~mixexport.runtime.Runtime` calls."""

    def __init__(self, entries: tuple[TableEntry, ...], store: TableStore, version: str = "") -> None:
        self.entries = entries
        self.store = store
        self.version = version

    def expand(self, request: Request) -> Request:
        """``request`` plus the rows input of every replaced lookup, on the id input's side (the
        store refuses unknown ids: nothing is scored then)."""
        user, item = dict(request.user), dict(request.item)
        plans, wanted = [], {}
        for table in self.entries:
            sides, ids_list = [], []
            for use in table.uses:
                side = user if use.input in request.user else item
                ids = use.global_ids(side[use.input])
                sides.append((use, side, ids.shape))
                ids_list.append(ids.reshape(-1))
            if not ids_list:
                continue
            distinct, inverse = np.unique(np.concatenate(ids_list), return_inverse=True)
            wanted[table.name] = distinct
            plans.append((table, sides, ids_list, inverse))
        rows = self.rows(wanted)
        for table, sides, ids_list, inverse in plans:
            at = 0
            for (use, side, shape), ids in zip(sides, ids_list):
                side[use.rows.name] = rows[table.name][inverse[at:at + ids.size]].reshape(*shape, table.dim)
                at += ids.size
        return dataclasses.replace(request, user=user, item=item)

    def rows(self, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of each table's distinct ids: one ``lookup`` per table (a store that can fetch every
        table in one round trip overrides this)."""
        return {name: self.store.lookup(name, ids) for name, ids in wanted.items()}

    def close(self) -> None:
        self.store.close()
