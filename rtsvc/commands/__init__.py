"""The `rtsvc` command: cli.py and cli_options.py at the repository root, installed here
(pyproject.toml maps this package onto the root folder). This file only lets an editable install
find them; the wheel's rtsvc.commands is the root folder's two modules.

Run from a source tree (a git worktree beside the editable install, PYTHONPATH=<tree>), the root
folder of the tree this package sits in comes first, so `rtsvc.commands.cli` is that tree's cli.py and
not the editable install's (whose finder would otherwise answer for the child modules)."""

from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if (_ROOT / "cli.py").is_file() and str(_ROOT) not in __path__:
    __path__.insert(0, str(_ROOT))
