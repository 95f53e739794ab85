"""Verify and score bundles on Parquet data sets of any size, in bounded memory.

- :mod:`~mixexport.scale.files` — the input files and their footers, ``--out`` rules;
- :mod:`~mixexport.scale.schema` — the row layout (one column per bundle input) and batch → feeds;
- :mod:`~mixexport.scale.reader` — a file's batches, the one Parquet reader of every engine;
- :mod:`~mixexport.scale.worker` — one batch scored into a mergeable partial (what every engine runs);
- :mod:`~mixexport.scale.local` / :mod:`~mixexport.scale.ray` — the engines (pyarrow; Ray Data actors);
- :mod:`~mixexport.scale.sink` / :mod:`~mixexport.scale.totals` — the driver's merge and writes;
- :mod:`~mixexport.scale.run` — ``verify_dataset`` and ``score_dataset``.

The metrics themselves (exact sums, AUC with a stated bound) are in
:mod:`mixexport.verification.streaming`.
"""
