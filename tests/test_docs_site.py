"""The documentation site builds strictly (a broken link, an anchor that does not exist or a
page left out of the navigation fails), and the README stays a front page whose links work
and whose test command is the one CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.docs_text import REPO, doc_snippets


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    problems = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    assert result.returncode == 0, "\n".join(problems)
    assert (tmp_path / "reference" / "cli" / "index.html").exists()


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    [command] = [
        s.text.strip() for s in doc_snippets("README.md", "Quick start", "sh") if "[test]" in s.text
    ]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci, f".ci/run does not run the README's {command!r}"


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300  # the rest belongs in docs/
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links to no page"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, missing
