"""The `rtsvc` command: cli.py and cli_options.py at the repository root, installed here
(pyproject.toml maps this package onto the root folder). This file only lets an editable install
find them; the wheel's rtsvc.commands is the root folder's two modules."""

from pathlib import Path

# A source checkout on PYTHONPATH (a worktree beside the editable install) imports its own cli.py,
# not the one the editable install maps to: its root folder comes first on this package's path.
_ROOT = Path(__file__).resolve().parents[2]
if (_ROOT / "cli.py").is_file():
    __path__.insert(0, str(_ROOT))  # noqa: F821 - a package's __path__
