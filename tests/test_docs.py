"""The docs stand alone: every link between them resolves inside the repository, and none points outside it."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_relative_link_resolves_inside_the_repository():
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
            assert resolved.exists(), f"{doc.name} links to {target}, which is not there"


def test_the_readme_tours_every_document():
    readme = (ROOT / "README.md").read_text()
    for doc in ["docs/architecture.md", "docs/method.md", "docs/config.md", "docs/extending.md",
                "cluster/README.md"]:
        assert f"]({doc})" in readme, f"README.md does not link {doc}"
