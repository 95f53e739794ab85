"""The ``mixexport`` command line. Commands are registered from one explicit list; each parses
its options, calls one library function and prints a summary (``--json`` for machines).

Exit codes: 0 ok · 1 check failed · 2 usage or bad input · 3 environment unavailable ·
4 internal error (a bug: the traceback is printed).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import traceback

import click

from mixexport import __version__
from mixexport.cli import bench, build, inspect, passes, publish, score, triton, verify
from mixexport.errors import MixexportError

COMMANDS = (build.command, verify.command, bench.command, inspect.command, passes.command, triton.command,
            score.command, publish.command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixexport")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Turn trained mixer-family ranking models into verified, fast, servable bundles."""
    ctx.obj = {"verbosity": -1 if quiet else verbose}
    configure_logging(verbose)


class OwnRecordsOnly(logging.Filter):
    """Without ``-v`` the terminal shows mixexport's own log lines only. Libraries' records (e.g.
    onnxscript's constant-folding warnings) and Python warnings (torch's FutureWarnings, captured
    as the ``py.warnings`` logger) are about the libraries, not the user's model: ``-v`` shows them."""

    def __init__(self, verbose: int) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose > 0 or record.name == "mixexport" or record.name.startswith("mixexport.")


def configure_logging(verbose: int) -> None:
    """Log records and Python warnings to stderr: WARNING and up, mixexport's own only (``-v``: INFO
    and libraries' too, ``-vv``: DEBUG). Like ``logging.basicConfig``, an application that already
    configured the root logger keeps its handlers."""
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _CliHandler)), None)
    if handler is None and not root.handlers:
        handler = _CliHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if handler is not None:
        handler.filters[:] = [OwnRecordsOnly(verbose)]
        root.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    logging.captureWarnings(True)


class _CliHandler(logging.StreamHandler):
    """The stderr handler the CLI installs (found again, not stacked, when main runs twice)."""


for _command in COMMANDS:
    cli.add_command(_command)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temp dirs are removed, nothing half-written


def main(argv: list[str] | None = None) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        code = cli.main(args=argv, prog_name="mixexport", standalone_mode=False)
    except MixexportError as e:
        click.echo(f"error: {e.message}", err=True)
        if e.hint:
            click.echo(f"hint: {e.hint}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    except Exception:  # noqa: BLE001 - anything else is a bug: show everything
        traceback.print_exc()
        click.echo("error: internal error in mixexport (a bug). Please report it with the traceback above.",
                   err=True)
        sys.exit(4)
    sys.exit(code if isinstance(code, int) else 0)
