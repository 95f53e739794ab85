"""Run a user's program in eager at the shapes mixexport serves, before anything is exported.

mixexport serves 1 user × N candidates (and U users × N): the model sees N flat rows, N = 1
included. A model that cannot run there (a bare ``.squeeze()`` that drops the batch axis at batch 1,
as DCN-v2 implementations do, or a program exported with ``Dim("batch", min=2)``) would otherwise
fail deep inside the build, after export, with a traceback that blames mixexport. Here it is
refused in one line that quotes eager's own error, so the user sees the model's fault and fixes it
where it is.

The shapes checked (each a real request, rows as the eager reference sees them): 1 user × 1
candidate, 1 × :data:`CANDIDATES`, :data:`USERS` × :data:`CANDIDATES`. A run passes when it raises
nothing and every output keeps a leading axis of the request's row count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mixexport.errors import BadInputError

CANDIDATES, USERS = 3, 2  # small: this runs on every load of a .pt2 (inspect, build, verify)
SERVES = "mixexport serves 1 user × N candidates (N rows, N = 1 included)"
HINT = ("make forward() run at every batch size and keep the batch axis in every output (e.g. "
        ".squeeze(-1) instead of a bare .squeeze()), then export it again")


def check_eager(source: Any) -> None:
    """Raise :class:`BadInputError` (exit 2) when ``source``'s eager module fails at a served shape.
    ``source`` is a :class:`mixexport.source.Source` (not imported: source.py calls this module)."""
    lowest = source.minimums.get("batch", 1)
    if lowest > 1:  # the program's own range check is not run by every torch path: say it here
        raise BadInputError(f"the program was exported with batch >= {lowest}; {SERVES}, so it must run at batch 1",
                            "export with dynamic_shapes={name: {0: torch.export.Dim('batch')}} (no min) "
                            "for every input")
    for users, candidates in ((1, 1), (1, CANDIDATES), (USERS, CANDIDATES)):
        rows = source.example_request(users, candidates, seed=3).rows()
        where = f"batch {candidates}" if users == 1 else f"{users} users × {candidates} candidates"
        args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
        try:
            with torch.inference_mode():
                out = source.module(**args)
        except Exception as e:  # noqa: BLE001 - any error of the user's model is the finding itself
            raise BadInputError(f"your model fails at {where} in eager: {quote(e)}; {SERVES}, so it must "
                                f"run at {where}", HINT) from None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for spec, value in zip(source.outputs, outs):
            shape = tuple(getattr(value, "shape", ()))
            if not shape or shape[0] != candidates:
                raise BadInputError(f"your model's output {spec.name!r} has shape {list(shape)} at {where} in "
                                    f"eager, expected a leading batch axis of {candidates}; {SERVES}, so every "
                                    "output must keep the batch axis", HINT)


def quote(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters."""
    first = (str(error).strip().splitlines() or [""])[0].strip()
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
