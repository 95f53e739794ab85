"""Run the real ``mixexport`` entry point in-process (same code path as the console script:
``mixexport.cli.main``), capturing exit code, stdout and stderr."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mixexport.cli import main

#: The installed console script, for tests that need a separate process.
MIXEXPORT = str(Path(sys.executable).parent / "mixexport")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*args: str) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to a bundle's manifest.json in place (tests that tamper with a bundle copy)."""
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))
