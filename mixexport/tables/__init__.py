"""Embedding tables outside the engine (``externalize-embeddings``).

A bundle may leave its large embedding tables out of the dense segments: each lookup becomes a float
input carrying the looked-up rows, and the table lives as hashed part files in the bundle, served by
a *table store*. The modules, one responsibility each:

- :mod:`~mixexport.tables.layout`: the id → (partition, row) rule, part-file names, the manifest
  entry of a table and the ``tables_version`` digest;
- :mod:`~mixexport.tables.writer`: writes a table's part files streaming (one partition plus a fixed
  buffer in memory);
- :mod:`~mixexport.tables.stores`: the :class:`~mixexport.tables.stores.base.TableStore` protocol,
  the request expansion the runtime calls, and the ``local`` (mmap) and in-memory stores.

See docs/tables.md.
"""
