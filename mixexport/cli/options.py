"""Option decorators shared by commands, and the small output helpers they use."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

F = Callable[..., Any]


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(f)


def checkpoint_option(f: F) -> F:
    return click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                        help="The model the bundle was built from (default: the path in the manifest).")(f)


def device_option(f: F) -> F:
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                        help="Where to run the bundle.")(f)


def backend_option(f: F) -> F:
    return click.option("--backend", default=None,
                        help="Backend to run the segments with (default: the bundle's own).")(f)


def tables_option(f: F) -> F:
    """``--tables STORE``: where a bundle with externalized tables reads them (docs/tables.md)."""
    return click.option("--tables", default=None, metavar="STORE",
                        help="Table store of a bundle with externalized tables: 'local' (its part files, the "
                             "default) or redis://HOST:PORT[,HOST:PORT...] (published with mixexport publish).")(f)


def tolerance_options(f: F) -> F:
    f = click.option("--rtol", multiple=True, metavar="[NAME:]VALUE",
                     help="Relative tolerance, per output or for all (repeatable).")(f)
    return click.option("--atol", multiple=True, metavar="[NAME:]VALUE",
                        help="Absolute tolerance, per output or for all (repeatable).")(f)


def data_options(f: F) -> F:
    f = click.option("--no-metrics", is_flag=True, help="Skip metric parity on labelled data.")(f)
    return click.option("--data", type=click.Path(dir_okay=False), default=None,
                        help="Labelled .npz (one array per input + 'label') for metric parity "
                             "(default: MovieLens-100k for models trained on it).")(f)


def pass_options_option(f: F) -> F:
    """``--option PASS.FIELD=VALUE`` (repeatable), checked while the command line is parsed: a
    misspelled pass, field or value fails at once, before torch loads (``mixexport.passes.options``
    imports nothing heavy)."""
    return click.option("--option", "pass_options", multiple=True, metavar="PASS.FIELD=VALUE",
                        callback=_check_pass_options, help="A pass option (repeatable).")(f)


def _check_pass_options(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    from mixexport.passes.options import check_specs

    check_specs(value)  # raises BadInputError: main prints error/hint, exit 2
    return value


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def parse_csv_ints(value: str, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise click.BadParameter(f"expected positive integers separated by commas, found {value!r}",
                                 param_hint=what)
    return out


class Progress:
    """Step messages on stderr: a live spinner on a terminal, plain lines otherwise (-q: none)."""

    def __init__(self, verbosity: int) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.verbosity = verbosity
        self.status = None

    def __enter__(self) -> Progress:
        if self.verbosity >= 0 and self.console.is_terminal:
            self.status = self.console.status("starting")
            self.status.__enter__()
        return self

    def __call__(self, message: str) -> None:
        if self.verbosity < 0:
            return
        if self.status is not None:
            self.status.update(message)
        else:
            self.console.print(f"· {message}", highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)


def progress(ctx: click.Context) -> Progress:
    return Progress((ctx.obj or {}).get("verbosity", 0))
