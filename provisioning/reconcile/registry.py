"""Reading a police registry export, row by row (docs/registry.md).

A CSV file in UTF-8, UTF-8 with a BOM, UTF-16 with a BOM (Excel's "Unicode text") or
GBK/GB 18030 (what Chinese Excel writes), detected or named; or an .xlsx workbook (its
first sheet, or the one named). The header row is found among the first rows (exports
often start with a title line); the columns are recognised by their English or Chinese
names, or by a mapping file. Only the six documented columns are read: names, birth
dates and the other columns of an export are never looked at.

Each data row comes out as a ``Row`` (checked: a valid permit number, a building, a
known status, dates that are dates) or as a ``Malformed`` with its line number and the
reason; blank rows are counted. Nothing is held but the row being read, so a file of a
million rows reads in constant memory.
"""

from __future__ import annotations

import codecs
import csv
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO, TypeVar

from protocol.permits import PermitError, validate_permit
from provisioning.errors import CentralUsageError

_T = TypeVar("_T")

COLUMNS = ("permit_number", "building", "unit", "registered_on", "valid_until", "status")
"""The documented columns, by their English names."""
REQUIRED = ("permit_number", "building", "status")
HEADERS: dict[str, tuple[str, ...]] = {
    "permit_number": ("permit_number", "permit", "permit_no", "证件号码", "证件号",
                      "身份证号码", "身份证号", "公民身份号码"),
    "building": ("building", "site", "房屋编号"),
    "unit": ("unit", "room", "房号", "房间号"),
    "registered_on": ("registered_on", "登记日期"),
    "valid_until": ("valid_until", "有效期至"),
    "status": ("status", "状态"),
}
"""The header names each column is recognised by (after ``header_key``)."""
STATUSES: dict[str, str] = {
    "active": "active", "lapsed": "lapsed", "cancelled": "cancelled",
    "canceled": "cancelled", "moved_out": "moved_out",
    "有效": "active", "过期": "lapsed", "注销": "cancelled", "迁出": "moved_out",
}
"""Status values as exports write them (after ``header_key``) → the registry status."""
HEADER_SEARCH_ROWS = 20
"""The header is looked for among this many first non-blank rows."""
DELIMITERS = (",", "\t", ";", "|")
MAX_LISTED = 10_000
"""Malformed rows listed one by one (all of them are counted)."""
ENCODING_PROBE = 1 << 20
"""Bytes decoded at a time while telling UTF-8 from GB 18030."""
EPOCH = date(1970, 1, 1)
CACHED = 100_000
"""Values of one column remembered while reading (statuses, dates, buildings)."""
_MISSING = object()
EXCEL_EPOCH = date(1899, 12, 30)
"""Day 0 of Excel's serial dates (with its 1900 leap-year bug, this is the usual base)."""
_MAPPING_KEYS = {"columns": set(COLUMNS), "status": None,
                 "read": {"encoding", "delimiter", "sheet", "header_line", "date_formats"}}


class RegistryError(CentralUsageError):
    """The export cannot be read at all (its file, encoding, header or mapping); the
    message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Row:
    """A usable row."""

    line: int
    permit: str
    building: str
    unit: str | None
    status: str
    registered_day: int | None
    valid_until_day: int | None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row that was skipped, and why (never with its permit number)."""

    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """A mapping file's settings (docs/registry.md, "A mapping file")."""

    columns: dict[str, str] = field(default_factory=dict)
    """Column → the header the export uses for it."""
    status: dict[str, str] = field(default_factory=dict)
    """A value the export writes → the registry status."""
    encoding: str | None = None
    delimiter: str | None = None
    sheet: str | None = None
    header_line: int | None = None
    date_formats: tuple[str, ...] = ()


@dataclass(slots=True)
class Counts:
    """What reading found, filled in as the rows go by."""

    rows: int = 0
    """Data rows after the header (blank ones not included)."""
    used: int = 0
    blank: int = 0
    malformed: int = 0
    malformed_rows: list[Malformed] = field(default_factory=list)
    """The first ``MAX_LISTED``."""


def header_key(text: str) -> str:
    """A header or status value compared loosely: full-width forms made ASCII (NFKC),
    surrounding space and a BOM dropped, lower case, inner spaces and hyphens as ``_``."""
    text = unicodedata.normalize("NFKC", text).replace("\ufeff", "").strip().lower()
    return "_".join(text.replace("-", " ").split())


def building_key(text: str) -> str:
    """A building as the office names it: full-width forms made ASCII, no surrounding
    space, lower case (site ids are lower case: ``BLDG-0001`` is ``bldg-0001``)."""
    return unicodedata.normalize("NFKC", text).strip().lower()


def day_number(day: date) -> int:
    """Days since 1970-01-01."""
    return (day - EPOCH).days


def load_mapping(path: Path) -> ColumnMapping:
    """A mapping file (TOML), every key checked; ``RegistryError`` naming the file and
    the key otherwise."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise RegistryError(f"--mapping {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"--mapping {path}: not TOML: {exc}") from None
    _check_keys(path, data)
    columns, statuses, read = (data.get(s, {}) for s in ("columns", "status", "read"))
    for key, value in [*columns.items(), *statuses.items()]:
        if not isinstance(value, str) or not value.strip():
            raise RegistryError(f"--mapping {path}: {key}: must be a non-empty string")
    for key, value in statuses.items():
        if value not in STATUSES.values():
            raise RegistryError(f"--mapping {path}: status.{key} = {value!r}: one of "
                                f"{', '.join(sorted(set(STATUSES.values())))}")
    _check_read(path, read)
    return ColumnMapping({k: header_key(v) for k, v in columns.items()},
                         {header_key(k): v for k, v in statuses.items()},
                         read.get("encoding"), read.get("delimiter"), read.get("sheet"),
                         read.get("header_line"), tuple(read.get("date_formats", ())))


def _check_keys(path: Path, data: dict[str, Any]) -> None:
    for section, value in data.items():
        if section not in _MAPPING_KEYS:
            raise RegistryError(f"--mapping {path}: unknown section [{section}] (known: "
                                f"{', '.join(_MAPPING_KEYS)})")
        if not isinstance(value, dict):
            raise RegistryError(f"--mapping {path}: {section} must be a table")
        allowed = _MAPPING_KEYS[section]
        for key in value:
            if allowed is not None and key not in allowed:
                raise RegistryError(f"--mapping {path}: {section}.{key}: unknown key "
                                    f"(known: {', '.join(sorted(allowed))})")


def _check_read(path: Path, read: dict[str, Any]) -> None:
    header_line = read.get("header_line")
    if header_line is not None and (not isinstance(header_line, int) or header_line < 1):
        raise RegistryError(f"--mapping {path}: read.header_line: a line number (1 or more)")
    formats = read.get("date_formats", [])
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise RegistryError(f"--mapping {path}: read.date_formats: a list of strptime formats")
    for key in ("encoding", "delimiter", "sheet"):
        if key in read and not isinstance(read[key], str):
            raise RegistryError(f"--mapping {path}: read.{key}: must be a string")
    if "delimiter" in read and len(read["delimiter"]) != 1:
        raise RegistryError(f"--mapping {path}: read.delimiter: one character")


def detect_encoding(path: Path) -> str:
    """``utf-8-sig`` or ``utf-16`` by their BOM; else ``utf-8`` when the whole file
    decodes as UTF-8, else ``gb18030`` (a superset of GBK). Reads the file once, a
    megabyte at a time."""
    try:
        with path.open("rb") as raw:
            head = raw.read(4)
            if head.startswith(codecs.BOM_UTF8):
                return "utf-8-sig"
            if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                return "utf-16"
            raw.seek(0)
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            try:
                while chunk := raw.read(ENCODING_PROBE):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return "gb18030"
    except OSError as exc:
        raise RegistryError(f"--registry {path}: {exc.strerror}") from None
    return "utf-8"


class _Columns:
    """Where each column is in a row, found from the header."""

    def __init__(self, index: dict[str, int], width: int) -> None:
        self.index = index
        self.width = width

    @classmethod
    def find(cls, header: Sequence[object], mapping: ColumnMapping) -> _Columns | None:
        """The columns of ``header`` if it names every required one, else None."""
        names = {key: (mapping.columns[key],) if key in mapping.columns else HEADERS[key]
                 for key in COLUMNS}
        index: dict[str, int] = {}
        for i, cell in enumerate(header):
            text = header_key(str(cell)) if cell is not None else ""
            for key, known in names.items():
                if text and text in known:
                    if key in index:
                        raise RegistryError(f"two columns for {key} (columns {index[key] + 1} "
                                            f"and {i + 1}): name one in a mapping file")
                    index[key] = i
        if not all(key in index for key in REQUIRED):
            return None
        return cls(index, len(header))


class RegistryFile:
    """One registry export: its format, encoding and rows (see the module docstring)."""

    def __init__(self, path: Path, *, encoding: str | None = None,
                 mapping: ColumnMapping | None = None, today: date | None = None) -> None:
        self.path = path
        self.mapping = mapping or ColumnMapping()
        self.today = today or date.today()
        if not path.is_file():
            raise RegistryError(f"--registry {path}: no such file")
        self.format = "xlsx" if path.suffix.lower() in (".xlsx", ".xlsm") else "csv"
        chosen = encoding or self.mapping.encoding
        if self.format == "xlsx":
            self.encoding: str | None = None
        elif chosen is not None:
            try:
                codecs.lookup(chosen)
            except LookupError:
                raise RegistryError(f"--encoding {chosen!r}: not an encoding Python knows "
                                    "(utf-8, utf-8-sig, gbk, gb18030, utf-16)") from None
            self.encoding = chosen
        else:
            self.encoding = detect_encoding(path)
        self.delimiter: str | None = None
        self.header_line: int | None = None
        self.counts = Counts()
        self._memo: dict[str, dict[object, object]] = {}

    # -- reading ---------------------------------------------------------------------------

    def rows(self) -> Iterator[Row | Malformed]:
        """Every data row, checked, in file order (``counts`` is filled in meanwhile)."""
        self.counts = Counts()
        raw = self._xlsx_rows() if self.format == "xlsx" else self._csv_rows()
        columns: _Columns | None = None
        searched = 0
        for line, cells in raw:
            if not any(_text(c) for c in cells):
                if columns is not None:
                    self.counts.blank += 1
                continue
            if columns is None:
                columns = self._header(line, cells, searched)
                searched += 1
                continue
            self.counts.rows += 1
            result = self._row(line, cells, columns)
            if isinstance(result, Malformed):
                self.counts.malformed += 1
                if len(self.counts.malformed_rows) < MAX_LISTED:
                    self.counts.malformed_rows.append(result)
            else:
                self.counts.used += 1
            yield result
        if columns is None:
            raise RegistryError(f"--registry {self.path}: no header row naming the columns "
                                f"{', '.join(REQUIRED)} (docs/registry.md)")

    def _header(self, line: int, cells: Sequence[object], searched: int) -> _Columns | None:
        wanted = self.mapping.header_line
        if wanted is not None and line != wanted:
            if line > wanted:
                raise RegistryError(f"--registry {self.path}: line {wanted} (the mapping's "
                                    "header_line) is blank")
            return None
        try:
            columns = _Columns.find(cells, self.mapping)
        except RegistryError as exc:
            raise RegistryError(f"--registry {self.path}: line {line}: {exc}") from None
        if columns is not None:
            self.header_line = line
            return columns
        if wanted is not None or searched + 1 >= HEADER_SEARCH_ROWS:
            found = ", ".join(repr(_text(c)) for c in cells if _text(c))[:300]
            raise RegistryError(
                f"--registry {self.path}: line {line}: no header naming "
                f"{', '.join(REQUIRED)} (found {found}); name the columns in a mapping file "
                "(docs/registry.md)")
        return None

    def _csv_rows(self) -> Iterator[tuple[int, Sequence[object]]]:
        assert self.encoding is not None
        try:
            with self.path.open("r", encoding=self.encoding, newline="") as text:
                self.delimiter = self.mapping.delimiter or _delimiter(text, self.mapping)
                text.seek(0)
                reader = csv.reader(text, delimiter=self.delimiter)
                while True:
                    start = reader.line_num + 1
                    try:
                        cells = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        raise RegistryError(f"--registry {self.path}: line {start}: {exc}"
                                            ) from None
                    yield start, cells
        except UnicodeDecodeError as exc:
            raise RegistryError(
                f"--registry {self.path}: not {self.encoding} (byte {exc.start} of a "
                "block cannot be decoded); give the right --encoding") from None
        except OSError as exc:
            raise RegistryError(f"--registry {self.path}: {exc.strerror}") from None

    def _xlsx_rows(self) -> Iterator[tuple[int, Sequence[object]]]:
        try:
            import openpyxl  # noqa: PLC0415 - the office extra; only .xlsx needs it
        except ImportError:
            raise RegistryError("reading .xlsx needs openpyxl: pip install "
                                "'permitgate[office]'") from None
        try:
            book = openpyxl.load_workbook(self.path, read_only=True, data_only=True)
        except Exception as exc:  # noqa: BLE001 - openpyxl raises many kinds for a bad file
            raise RegistryError(f"--registry {self.path}: not a readable .xlsx workbook: "
                                f"{exc}") from None
        try:
            name = self.mapping.sheet
            if name is not None and name not in book.sheetnames:
                raise RegistryError(f"--registry {self.path}: no sheet {name!r} (sheets: "
                                    f"{', '.join(book.sheetnames)})")
            sheet = book[name] if name is not None else book.worksheets[0]
            yield from enumerate(sheet.iter_rows(values_only=True), start=1)
        finally:
            book.close()

    # -- one row -----------------------------------------------------------------------

    def _row(self, line: int, cells: Sequence[object], columns: _Columns) -> Row | Malformed:
        index, width = columns.index, len(cells)

        def cell(key: str) -> object:
            i = index.get(key)
            return cells[i] if i is not None and i < width else None

        try:
            if width > columns.width and any(_text(c) for c in cells[columns.width:]):
                raise _RowError(f"{width} cells, but the header names {columns.width}")
            number = _permit(cell("permit_number"), self.today)
            building = self._cached("building", cell("building"), _building)
            status = self._cached("status", cell("status"), self._status)
            registered = self._cached("registered_on", cell("registered_on"), self._day)
            valid_until = self._cached("valid_until", cell("valid_until"), self._day)
        except _RowError as bad:
            return Malformed(line, str(bad))
        unit = _text(cell("unit"))
        if not unit.isascii():
            unit = unicodedata.normalize("NFKC", unit)
        return Row(line, number, building, " ".join(unit.split()) or None, status,
                   registered, valid_until)

    def _cached(self, key: str, value: object, parse: Callable[[str, object], _T]) -> _T:
        """``parse(key, value)``, remembered per column: an export repeats the same few
        statuses, dates and buildings a million times (``CACHED`` values at most; a
        malformed value is not remembered and fails again)."""
        try:
            remembered = self._memo[key]
        except KeyError:
            remembered = self._memo[key] = {}
        found = remembered.get(value, _MISSING)
        if found is _MISSING:
            found = parse(key, value)
            if len(remembered) >= CACHED:
                remembered.clear()
            remembered[value] = found
        return found  # type: ignore[return-value]  # what parse returned for this value

    def _status(self, _key: str, value: object) -> str:
        key = header_key(_text(value))
        status = self.mapping.status.get(key) or STATUSES.get(key)
        if status is None:
            raise _RowError(f"status: {_text(value)[:20]!r} is none of active, lapsed, "
                            "cancelled, moved_out (有效, 过期, 注销, 迁出)")
        return status

    def _day(self, key: str, value: object) -> int | None:
        """A date cell as a day number (None when empty)."""
        try:
            day = _as_date(value, self.mapping.date_formats)
        except ValueError:
            raise _RowError(f"{key}: {_text(value)[:30]!r} is not a date") from None
        return None if day is None else day_number(day)


def _building(_key: str, value: object) -> str:
    building = building_key(_text(value))
    if not building:
        raise _RowError("building: empty")
    return building


class _RowError(Exception):
    """Why a row is malformed."""


def _permit(value: object, today: date) -> str:
    if isinstance(value, float | int) and not isinstance(value, bool):
        raise _RowError("permit_number: stored as a number, which loses digits (format the "
                   "column as text in the export)")
    try:
        return validate_permit(_text(value), today=today).number
    except PermitError as exc:
        raise _RowError(f"permit_number: {exc.rule}") from None


def _as_date(value: object, formats: Iterable[str]) -> date | None:
    """A date cell: a date, a datetime, YYYYMMDD or an Excel serial number, or text
    (``parse_date``); ``ValueError`` when it is none of these."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        if 19_000_101 <= value <= 29_991_231 and float(value).is_integer():
            return parse_date(str(int(value)))
        if not 1 <= value < 2_958_466:  # an Excel serial date, up to 9999-12-31
            raise ValueError(value)
        return EXCEL_EPOCH + timedelta(days=int(value))
    text = unicodedata.normalize("NFKC", _text(value)).strip()
    return parse_date(text, formats) if text else None


def parse_date(text: str, formats: Iterable[str] = ()) -> date:
    """A date as exports write it: the mapping's formats first, then ISO (2026-01-31,
    also with a time after it), 2026/01/31, 2026.01.31, 20260131, 2026年1月31日."""
    for form in formats:
        try:
            return datetime.strptime(text, form).date()
        except ValueError:
            continue
    head = text.replace("T", " ").split(" ", 1)[0]
    head = head.replace("年", "-").replace("月", "-").replace("日", "")
    head = head.replace("/", "-").replace(".", "-")
    if head.isdigit() and len(head) == 8:
        head = f"{head[:4]}-{head[4:6]}-{head[6:]}"
    parts = head.split("-")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(text)
    return date(int(parts[0]), int(parts[1]), int(parts[2]))


def _text(value: object) -> str:
    if type(value) is str:
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _delimiter(text: TextIO, mapping: ColumnMapping) -> str:
    """The delimiter that splits the first lines into the most known column names."""
    known = {name for key in COLUMNS
             for name in ((mapping.columns[key],) if key in mapping.columns
                          else HEADERS[key])}
    lines = [text.readline() for _ in range(HEADER_SEARCH_ROWS)]

    def score(delimiter: str) -> tuple[int, int]:
        best = (0, 0)
        for line in lines:
            cells = next(csv.reader([line], delimiter=delimiter), [])
            hits = sum(1 for c in cells if header_key(c) in known)
            best = max(best, (hits, len(cells)))
        return best

    return max(DELIMITERS, key=score)
