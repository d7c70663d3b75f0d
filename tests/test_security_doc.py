"""docs/security.md, the threat model, cites only what exists: every ``tests/...py::name``
it names is a test in that file, every repository path it names is there, every anchor it
links to (and every anchor other files link to in it) is a heading, and every threat has
its attack, its defences, the tests that show them and what remains open."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"

CITATION = re.compile(r"\btests/((?:[A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+\.py)::([A-Za-z_]\w*(?:::\w+)?)")
"""A cited test: ``tests/file.py::test_name`` (or ``::Class::test_name``)."""
REPO_PATH = re.compile(
    r"`((?:agent|common|config|docs|drivers|protocol|provisioning|scripts|systemd|tests)"
    r"/[A-Za-z0-9_./-]*)`")
"""A repository path in backticks, such as `agent/clock.py` or `config/mosquitto/acl`."""
LINK = re.compile(r"\]\(([A-Za-z0-9_./-]*\.md)?#([^)\s]+)\)")
"""A Markdown link with an anchor: ``[text](file.md#anchor)`` or ``[text](#anchor)``."""
PARTS = ("**The attacker can**", "**In place now", "**Shown by:**", "**Open:**")
"""The four parts of every threat, in this order."""
ISSUE_THREATS = (
    "Cloned UID-only cards", "A rogue broker or injected messages", "Replay and rollback",
    "A stolen SD card", "A tampered gateway", "A dishonest landlord", "A clock attack",
    "A full disk", "A hostile web client on the building network")
"""The threats the issue ("Years unattended on a Pi", Threat model) asks for by name."""


def collected_tests(path: Path) -> set[str]:
    """The tests pytest collects from ``path``: ``test_*`` functions at module level and
    ``Class::test_*`` methods of ``Test*`` classes, found with ast (nothing imported)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                         and item.name.startswith("test"))
    return names


def citations(text: str) -> list[tuple[str, str]]:
    """Every ``(file under tests/, test name)`` that ``text`` cites, in order."""
    return [(match.group(1), match.group(2)) for match in CITATION.finditer(text)]


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading's text."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of every heading of the Markdown file ``path`` (outside code blocks)."""
    found: set[str] = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(match.group(1)))
    return found


def threats(text: str) -> dict[str, str]:
    """Each ``###`` section under ``## Threat model``: its heading and its text."""
    assert "\n## Threat model\n" in text, "docs/security.md has no '## Threat model'"
    body = re.split(r"\n## ", text.split("\n## Threat model\n", 1)[1], maxsplit=1)[0]
    sections = re.split(r"^### (.+)$", body, flags=re.MULTILINE)
    return {sections[i].strip(): sections[i + 1] for i in range(1, len(sections), 2)}


def test_every_cited_test_exists() -> None:
    """Every test the threat model cites as ``tests/file.py::test_name`` is defined in that
    file, so renaming or removing a test fails here until the document follows."""
    cited = citations(DOC.read_text(encoding="utf-8"))
    assert len(cited) >= 50 and len({file for file, _ in cited}) >= 20, \
        "the citation pattern no longer finds the tests docs/security.md names"
    collected: dict[str, set[str]] = {}
    missing = []
    for file, name in cited:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"tests/{file}::{name} (no such file)")
            continue
        if name not in collected.setdefault(file, collected_tests(path)):
            missing.append(f"tests/{file}::{name}")
    assert not missing, "docs/security.md cites tests that do not exist: " + ", ".join(missing)


def test_citation_pattern_reads_the_forms_the_document_uses() -> None:
    """The citation pattern takes a test with or without its class and leaves out paths
    that name no test, so a citation cannot slip past the existence check unread."""
    text = ("`tests/test_a.py::test_one`, tests/sub/test_b.py::TestX::test_two, "
            "`tests/test_c.py`, tests/test_d.py:: and `agent/clock.py`")
    assert citations(text) == [("test_a.py", "test_one"), ("sub/test_b.py", "TestX::test_two")]


def test_every_threat_has_its_attack_defences_tests_and_open_items() -> None:
    """Each threat under "Threat model" says, in order, what the attacker can do, what is in
    place now, which tests show it (at least one), and what remains open."""
    sections = threats(DOC.read_text(encoding="utf-8"))
    assert len(sections) >= len(ISSUE_THREATS)
    for heading, body in sections.items():
        where = [body.find(part) for part in PARTS]
        assert -1 not in where and where == sorted(where), \
            f"threat {heading!r} lacks one of {PARTS} or has them out of order"
        shown_by = body[where[2]:where[3]]
        assert citations(shown_by), f"threat {heading!r} cites no test under 'Shown by'"
        unread = [line for line in shown_by.splitlines()
                  if line.startswith("- ") and not citations(line)]
        assert not unread, f"threat {heading!r}: not a tests/...py::name citation: {unread}"
        assert body[where[3]:].strip() != PARTS[3], f"threat {heading!r} lists nothing open"


def test_the_threats_the_issue_names_are_all_covered() -> None:
    """Every threat the issue names has a section of its own in the threat model."""
    headings = set(threats(DOC.read_text(encoding="utf-8")))
    assert not set(ISSUE_THREATS) - headings, set(ISSUE_THREATS) - headings


def test_every_repository_path_named_exists() -> None:
    """Every module, folder or file of this repository the document names in backticks
    (``agent/clock.py``, ``config/mosquitto/acl``, ...) exists."""
    paths = {match.group(1).split("::")[0]
             for match in REPO_PATH.finditer(DOC.read_text(encoding="utf-8"))}
    assert len(paths) >= 20, "the path pattern no longer finds the modules the document names"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"docs/security.md names paths that do not exist: {missing}"


def test_every_link_and_anchor_resolves() -> None:
    """Every anchor the document links to, here or in another document, is a heading
    there, and every anchor other files link to in it (and agent/clock.py's "A clock
    attack") is one of its headings."""
    own = anchors(DOC)
    broken = []
    for target, anchor in LINK.findall(DOC.read_text(encoding="utf-8")):
        path = DOC.parent / target if target else DOC
        if not path.is_file() or anchor not in anchors(path):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"docs/security.md links to anchors that do not exist: {broken}"
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    wanted = {anchor for path in sources
              for anchor in re.findall(r"security\.md#([A-Za-z0-9_-]+)", path.read_text(
                  encoding="utf-8"))}
    wanted.add(slug("A clock attack"))  # agent/clock.py: (docs/security.md, "A clock attack")
    assert wanted - {"a-clock-attack"}, "no other document's link to security.md was found"
    assert not wanted - own, f"anchors other files expect in security.md: {wanted - own}"
