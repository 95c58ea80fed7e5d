"""Every relative link in README.md and docs/*.md points at a file or folder that exists, so
moving a page or a module cannot leave a reader at a dead link (anchors are not checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_docs_commands import DOCS, ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")


def relative_links(doc: Path) -> list[str]:
    """The link targets of ``doc`` outside code, without their ``#anchor``, that are not URLs."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    targets = [m.group(1).split("#")[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:...


def test_the_docs_have_links_to_check():
    assert len(relative_links(ROOT / "README.md")) >= 10
    assert (ROOT / "docs").is_dir() and len(DOCS) > 5


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    missing = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)}: links to missing files: {missing}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t).resolve() for t in relative_links(ROOT / "README.md")}
    assert not [d.name for d in DOCS[1:] if d.resolve() not in linked]
