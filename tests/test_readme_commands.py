"""`.ci/run` runs exactly the README's install and test commands (the install one without its final
`rtsvc live`: CI has no sound card), so what CI proves is what a new user types."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIVE = " && rtsvc live --pitch 5"


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = next(part for part in text.split("\n## ") if part.startswith(heading))
    return re.search(r"```bash\n(.*?)\n```", section, re.DOTALL)[1]


def test_ci_runs_the_readme_commands():
    install, tests = readme_block("Install and run"), readme_block("Tests")
    assert install.endswith(LIVE) and "\n" not in install and "\n" not in tests
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "export ", "unset "))]
    assert commands == [install[: -len(LIVE)], tests]


def test_the_install_line_checks_the_set_up_before_live():
    install = readme_block("Install and run")
    assert "&& rtsvc doctor &&" in install and install.index("rtsvc doctor") < install.index("rtsvc live")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install  # not GBs of CUDA on a CPU box
