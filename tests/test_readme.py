"""README's two commands stand alone, and CI runs README's test command, not a copy that drifts.

A fresh venv has neither torch nor pytest, so each command installs what it needs in the same
line; ``.ci/run`` must run the test command character for character, or CI would pass while the
command a reader copies fails.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(heading: str) -> str:
    """The one line of the bash block under README's ``## heading``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README section {heading!r} has no bash block"
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_readmes_test_command_exactly():
    command = readme_command("Run the tests")
    ci = [line for line in (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    assert ci[-1] == command  # the last thing CI does, so its exit status is CI's


def test_readme_commands_install_what_they_run():
    tests = readme_command("Run the tests")
    assert tests.startswith("pip install torch==") and tests.endswith("&& pytest")
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', tests)
    assert extras and {"train", "cpu", "dev"} <= set(extras.group(1).split(","))
    main_job = readme_command("Run the main job: pre-train on your scans")
    assert main_job.startswith("pip install torch==") and " && gvsl train " in main_job
    assert "train" in re.search(r'pip install -e "\.\[([a-z,]+)\]"', main_job).group(1).split(",")
    # the extras named exist, and `dev` brings the test runner and the test-only peers
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for extra in extras.group(1).split(","):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra
    dev = re.search(r"^dev = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    for package in ("pytest", "nilearn", "SimpleITK"):
        assert f'"{package}' in dev, package
