"""The README works as written: its Python blocks run, its test command is the CI's, its links resolve.

A Python block preceded by ``<!-- skip-test: <reason> -->`` is not run (it needs a GPU, or changes the
whole process); every other one runs, in order, in one namespace, as a reader would paste them.
"""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_TAG = re.compile(r"<!--\s*skip-test:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` for each ```python block of ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[:match.start()].rstrip().splitlines()
        tag = SKIP_TAG.fullmatch(before[-1].strip()) if before else None
        blocks.append((text.count("\n", 0, match.start()) + 2, match.group(2), tag.group(1) if tag else None))
    return blocks


def test_blocks_are_found_and_skip_tags_give_a_reason():
    blocks = python_blocks(_readme())
    assert len([b for b in blocks if b[2] is None]) >= 6
    assert all(reason for _, _, reason in blocks if reason is not None)
    assert len(SKIP_TAG.findall(_readme())) == sum(reason is not None for _, _, reason in blocks), \
        "a skip-test tag that is not right above a python block"


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for line, code, skip in python_blocks(_readme()):
        if skip is None:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 (the README's own code)


def _commands(text: str) -> list[str]:
    return [line.strip() for match in FENCE.finditer(text) if match.group(1) == "bash"
            for line in match.group(2).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_test_command_is_the_one_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line.strip() for line in f if line.startswith("pip install")][0]
    readme_test = [c for c in _commands(_readme()) if "pytest" in c]
    assert len(readme_test) == 1
    assert readme_test[0].endswith(ci.replace("pip install -q ", "pip install ")), (readme_test[0], ci)
    assert readme_test[0].startswith("python3 -m venv .venv && . .venv/bin/activate && ")


def test_readme_starts_with_what_it_does_and_the_two_commands_and_keeps_layout():
    text = _readme()
    first_section = text.index("\n## ")
    commands = _commands(text[:first_section])
    assert [c.rsplit("&& ", 1)[-1] for c in commands] == ["python examples/megabyte_demo.py",
                                                          "python -m pytest -q -p no:logging"]
    assert "attnfuse finds attention" in text[:first_section]
    assert "\n## Layout\n" in text and len(text.splitlines()) < 450


@pytest.mark.parametrize("path", ["README.md", "docs/benchmarks.md"])
def test_relative_links_resolve(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    here = os.path.dirname(os.path.join(ROOT, path))
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")]
    assert targets
    missing = [t for t in targets if not os.path.exists(os.path.join(here, t))]
    assert not missing, missing
