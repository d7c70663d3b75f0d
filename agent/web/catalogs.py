"""The page's translation catalogs, kept with Babel (a development tool here).

    python -m agent.web.catalogs update    # extract messages, merge them into each .po
    python -m agent.web.catalogs compile   # .po -> .mo (committed; the server reads them)
    python -m agent.web.catalogs check     # exit 1 naming untranslated or stale messages

Messages come from the templates (``_()``, ``ngettext()``) and from this package's Python
(``_()`` in agent/web/messages.py and the views). English is the source language: its
catalog is empty and falls back to the text itself.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

from agent.web.i18n import CATALOG_NAMES, DOMAIN, LOCALES_DIR

PACKAGE = Path(__file__).parent
METHODS = [("templates/**.html", "jinja2.ext:babel_extract"), ("**.py", "python")]
OPTIONS = {"templates/**.html": {"extensions": "jinja2.ext.i18n", "trimmed": "false"}}
BABEL_LOCALES = {"zh_Hans": "zh_Hans_CN", "en": "en"}


def extract() -> Catalog:
    """Every message of the page, as a template catalog."""
    template = Catalog(project="permitgate", domain=DOMAIN)
    for filename, lineno, message, comments, context in extract_from_dir(
            PACKAGE, METHODS, OPTIONS, strip_comment_tags=True):
        template.add(message, None, [(filename, lineno)], auto_comments=comments,
                     context=context)
    return template


def _po_path(name: str) -> Path:
    return LOCALES_DIR / name / "LC_MESSAGES" / f"{DOMAIN}.po"


def _read(name: str) -> Catalog:
    path = _po_path(name)
    if path.exists():
        with path.open("rb") as fp:
            return read_po(fp, locale=BABEL_LOCALES[name], domain=DOMAIN)
    return Catalog(locale=BABEL_LOCALES[name], domain=DOMAIN, project="permitgate")


def _mo_bytes(catalog: Catalog) -> bytes:
    out = io.BytesIO()
    write_mo(out, catalog, use_fuzzy=False)
    return out.getvalue()


def update() -> None:
    """Merge the extracted messages into each language's .po file."""
    template = extract()
    for name in CATALOG_NAMES.values():
        catalog = _read(name)
        catalog.update(template, no_fuzzy_matching=True)
        path = _po_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fp:
            write_po(fp, catalog, width=100, omit_header=False, ignore_obsolete=True,
                     include_previous=False, sort_output=False, no_location=True)


def compile_all() -> None:
    """Write each language's .mo file from its .po file."""
    for name in CATALOG_NAMES.values():
        _po_path(name).with_suffix(".mo").write_bytes(_mo_bytes(_read(name)))


def problems() -> list[str]:
    """What is missing: messages without a Chinese translation, .po files behind the
    code, .mo files behind the .po files."""
    found: list[str] = []
    template = extract()
    wanted = {m.id for m in template if m.id}
    for name in CATALOG_NAMES.values():
        catalog = _read(name)
        have = {m.id for m in catalog if m.id}
        found += [f"{name}: not in the catalog: {mid!r}" for mid in sorted(
            wanted - have, key=str)]
        if name != "en":
            for message in catalog:
                if message.id and message.id in wanted and (
                        not message.string or message.fuzzy or (
                            isinstance(message.string, tuple) and not all(message.string))):
                    found.append(f"{name}: untranslated: {message.id!r}")
        mo = _po_path(name).with_suffix(".mo")
        if not mo.exists() or mo.read_bytes() != _mo_bytes(catalog):
            found.append(f"{name}: {mo.name} is out of date (run compile)")
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "check"
    if command == "update":
        update()
    elif command == "compile":
        compile_all()
    elif command == "check":
        found = problems()
        for line in found:
            print(line)
        return 1 if found else 0
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
