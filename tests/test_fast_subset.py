"""The fast subset (`pytest -m "not slow"`) names real modules and tests: a rename must not quietly
move a slow test into the edit-test loop."""

import ast
from pathlib import Path

from tests.conftest import SLOW_MODULES, SLOW_TESTS

HERE = Path(__file__).parent


def test_every_slow_name_in_conftest_exists():
    for module in SLOW_MODULES | set(SLOW_TESTS):
        assert (HERE / f"{module}.py").is_file(), f"conftest names {module}, which is gone"
    for module, names in SLOW_TESTS.items():
        tree = ast.parse((HERE / f"{module}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert names <= defined, f"{module} has no {sorted(names - defined)}"
