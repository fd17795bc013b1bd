"""Every ``docs/architecture.md §Section`` reference in the code names a section that exists there."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"architecture\.md\)? §([A-Z][\w -]*?)(?=[).,:;\"]|$| is\b)")


def test_references_name_existing_sections() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", doc, re.M)}
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cited = {}
    for name in files:
        path = REPO / name
        if path.suffix in (".py", ".md", ".yaml") and path.is_file() and name != "docs/architecture.md":
            for line in path.read_text(errors="replace").splitlines():
                for m in REFERENCE.finditer(line):
                    cited.setdefault(m.group(1).strip(), name)
    assert cited, "no references found: the pattern no longer matches how the code cites the document"
    missing = {section: name for section, name in cited.items() if section not in headings}
    assert not missing, f"sections cited but not headed in docs/architecture.md: {missing}"
