"""The `rtsvc` command line. Thin: parse options, call the library, print results.

Every user mistake surfaces as `rtsvc.errors.UserError`, printed as one line with exit code 2.
"""

import sys

import typer
from rich.console import Console

from rtsvc.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rtsvc: real-time voice conversion with RIFT-SVC models (live, websocket, files, training).",
)
console = Console(stderr=True)


# --- commands are added below, one section per feature; keep each a few lines of glue ---


def main() -> None:
    try:
        app()
    except UserError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
