"""The docs that are generated stay fresh, and the README stays short and its links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = r"\]\(([\w./-]+\.(?:md|py|json|sh|txt))(?:#[^)]*)?\)"  # links to files of the repository


def test_generated_pages_are_fresh() -> None:
    """docs/cli.md (from the Click commands) and docs/benchmarks.md (from benchmarks/results/*.json)
    equal what scripts/gen_docs.py writes now; a new option or result file without a rerun fails."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_cli_page_lists_every_command_and_option() -> None:
    from mixexport.cli import cli

    page = (ROOT / "docs" / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert f"## `mixexport {name}`" in page
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    assert opt in page, f"{name} {opt} missing from docs/cli.md"


def test_readme_is_short_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    links = re.findall(LINK, readme)
    assert links
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_docs_links_resolve() -> None:
    for page in (ROOT / "docs").glob("*.md"):
        for link in re.findall(LINK, page.read_text()):
            assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"
