"""The terminal shows mixexport's own lines: libraries' log records and Python warnings go to the
log, shown with ``-v``; the .pt2 loading path no longer triggers torch's pytree deprecation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import MIXEXPORT

EMIT = """
import logging, sys, warnings
from mixexport.cli import configure_logging
configure_logging(int(sys.argv[1]))
logging.getLogger("onnxscript.optimizer._constant_folding").warning("library warning line")
warnings.warn("library deprecation line", FutureWarning)
logging.getLogger("mixexport.pipeline").warning("own warning line")
logging.getLogger("mixexport.pipeline").info("own info line")
"""


def _stderr(verbose: int) -> str:
    r = subprocess.run([sys.executable, "-W", "default", "-c", EMIT, str(verbose)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_library_lines_only_with_verbose() -> None:
    quiet = _stderr(0)
    assert "own warning line" in quiet
    assert "library warning line" not in quiet and "library deprecation line" not in quiet
    assert "own info line" not in quiet
    loud = _stderr(1)
    for line in ("own warning line", "library warning line", "library deprecation line", "own info line"):
        assert line in loud


def test_inspect_of_a_pt2_prints_no_library_warnings(tmp_path: Path) -> None:
    from tests.test_program_input import save_program

    pt2 = save_program(tmp_path / "user.pt2")
    r = subprocess.run([sys.executable, "-W", "default", MIXEXPORT, "inspect", str(pt2)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "WARNING" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"program {pt2}")


def test_loading_a_pt2_calls_no_deprecated_torch_api(tmp_path: Path) -> None:
    import warnings

    from mixexport.source import load_source
    from tests.test_program_input import save_program

    pt2 = save_program(tmp_path / "user.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # treespec.children_specs raised one
        source = load_source(pt2)
        source.reference(source.example_feeds(3))
