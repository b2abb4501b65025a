"""The `rtsvc` command: cli.py and cli_options.py at the repository root, installed here
(pyproject.toml maps this package onto the root folder). This file only lets an editable install
find them; the wheel's rtsvc.commands is the root folder's two modules."""
