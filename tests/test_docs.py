"""The documentation: the MkDocs site builds strictly (no broken link or anchor, every page in the nav) and the
README's links, which MkDocs does not see, point at files that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from s2r.verdicts import README_BEGIN, README_END

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_mkdocs_site_builds_strictly(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "tracking" / "index.html").is_file()
    assert (tmp_path / "site" / "datasets" / "index.html").is_file()  # docs/datasets/README.md is that folder's index


def test_readme_is_short_links_resolve_and_keeps_the_two_commands_and_verdicts() -> None:
    text = (REPO / "README.md").read_text()
    assert "make run" in text and "make test" in text
    assert text.count(README_BEGIN) == 1 and text.count(README_END) == 1  # `s2r report --readme` rewrites it
    assert len(text.splitlines()) <= 200
    targets = [t.split("#")[0] for t in LINK.findall(text) if not t.startswith(("http://", "https://", "#"))]
    assert targets and all((REPO / t).exists() for t in targets), [t for t in targets if not (REPO / t).exists()]
