"""The folders are layers: a module imports only from its own layer or the ones below it
(docs/architecture.md). Function-local imports count too: a lazy import is still a dependency."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rtsvc"
# lowest first; a module may import from its own layer and every layer before it
LAYERS = [
    {"rtsvc.errors", "rtsvc.settings", "rtsvc.voice", "rtsvc.compute", "rtsvc.pretrained"},
    {"rtsvc.dsp"},
    {"rtsvc.models"},
    {"rtsvc.features"},
    {"rtsvc.backends"},
    {"rtsvc.voices"},
    {"rtsvc.engine", "rtsvc.offline", "rtsvc.autoblock", "rtsvc.pipeline"},
    {"rtsvc.live", "rtsvc.serve"},
    {"rtsvc.bench", "rtsvc.doctor", "rtsvc.commands", "rtsvc.eval"},
]

# installed as rtsvc.export, rtsvc.training and rtsvc.commands (pyproject.toml), but above the runtime
OUTSIDE_RUNTIME = {"export", "training", "commands"}


def layer_of(module: str) -> int | None:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in found if m.startswith("rtsvc.")]


def test_every_runtime_module_has_a_layer_and_imports_only_downwards():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        if module == "rtsvc.__init__":
            continue  # the package face re-exports from the top layers by design
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        own = layer_of(module)
        assert own is not None, f"{module} is in no layer: add its folder to LAYERS and docs/architecture.md"
        for target in imports_of(path):
            if target.split(".")[1] in OUTSIDE_RUNTIME:
                violations.append(f"{module} imports {target}: the runtime imports neither export, training "
                                  "nor the command line")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                violations.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert not violations, "\n".join(violations)


def test_the_layer_check_sees_a_violation(tmp_path):
    # the checker itself: an upward import in a lower layer is reported
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from rtsvc.serve.server import serve\n")
    assert [layer_of(m) for m in imports_of(fake)] == [7, 7]
