"""Write a request directory for the C++ scorers from a bundle's ``inputs/sample.npz``.

    python examples/cpp/make_request.py BUNDLE_DIR REQUEST_DIR

The directory holds one ``<input name>.npy`` per model input (user-side inputs with U rows, item
inputs with N rows) and ``user_index.npy`` (int64 [N]), the format ``bundle.hpp`` reads, plus for
``mixexport_score_ort`` an optional ``user_ids.npy`` (int64 [U], the per-user cache keys). A server
would fill the same arrays from its own request format.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np


def write_request(bundle: Path, out: Path) -> list[Path]:
    """Split ``bundle/inputs/sample.npz`` (keys ``user/<name>``, ``item/<name>``, ``user_index``)
    into ``out/<name>.npy`` files; returns the files written."""
    sample = np.load(Path(bundle) / "inputs" / "sample.npz", allow_pickle=False)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in sample.files:
        name = key.split("/", 1)[1] if "/" in key else key
        path = out / f"{name}.npy"
        np.save(path, np.ascontiguousarray(sample[key]))
        written.append(path)
    return written


def write_request_dir(request: Any, out: Path) -> Path:
    """Write a :class:`mixexport.specs.Request` as a request directory (with ``user_ids.npy`` when
    the request names its users: the C++ scorer keys its per-user caches by them; int ids only)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, arr in {**request.user, **request.item, "user_index": request.user_index}.items():
        np.save(out / f"{name}.npy", np.ascontiguousarray(arr))
    if request.user_ids is not None:
        np.save(out / "user_ids.npy", np.asarray(request.user_ids, dtype=np.int64))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for p in write_request(Path(sys.argv[1]), Path(sys.argv[2])):
        print(p)
