"""Reading police registry exports (provisioning/reconcile/registry.py): CSV in every
encoding Chinese offices write, .xlsx, header variants, a mapping file, and malformed rows
reported with their line numbers and counted, never skipped silently."""

from __future__ import annotations

import codecs
from datetime import date, datetime
from pathlib import Path

import openpyxl
import pytest

from protocol.permits import check_character
from provisioning.reconcile.registry import (
    HEADER_SEARCH_ROWS,
    Malformed,
    RegistryError,
    RegistryFile,
    Row,
    day_number,
    load_mapping,
    parse_date,
)

TODAY = date(2026, 6, 15)
P1 = "11010519491231002X"
P2 = "440524188001010014"
P3 = "810000199408230021"
CHINESE_HEADER = "证件号码,房屋编号,房号,登记日期,有效期至,状态"
ENGLISH_HEADER = "permit_number,building,unit,registered_on,valid_until,status"
FULL_WIDTH = "".join(chr(ord(c) + 0xFEE0) for c in "permit_number")
"""``permit_number`` in full-width forms, as a Chinese input method types it."""


def permit(n: int) -> str:
    """A valid citizen number (address 110105, born 1980-01-01, sequence ``n``)."""
    first17 = f"11010519800101{n:03d}"
    return first17 + check_character(first17)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` written to ``path`` in ``encoding`` (lines ending in CRLF, as Excel
    writes them)."""
    path.write_bytes(text.replace("\n", "\r\n").encode(encoding))
    return path


def read(path: Path, **options: object) -> tuple[RegistryFile, list[Row | Malformed]]:
    """The file and every row it yields."""
    registry = RegistryFile(path, today=TODAY, **options)  # type: ignore[arg-type]
    return registry, list(registry.rows())


def rows_only(found: list[Row | Malformed]) -> list[Row]:
    """The usable rows; fails on a malformed one."""
    assert all(isinstance(r, Row) for r in found), found
    return [r for r in found if isinstance(r, Row)]


def test_utf8_csv_with_english_headers_reads_every_row(tmp_path: Path) -> None:
    """A UTF-8 export with the English headers gives one checked row per line, with the
    permit normalised, the building as the office names it and dates as day numbers."""
    path = write(tmp_path / "r.csv", f"{ENGLISH_HEADER}\n"
                 f"{P1.lower()},BLDG-0001,301,2024-01-01,2027-12-31,active\n"
                 f"{P2},bldg-0002,,,,moved_out\n")
    registry, found = read(path)
    assert rows_only(found) == [
        Row(2, P1, "bldg-0001", "301", "active", day_number(date(2024, 1, 1)),
            day_number(date(2027, 12, 31))),
        Row(3, P2, "bldg-0002", None, "moved_out", None, None)]
    assert (registry.format, registry.encoding, registry.delimiter) == ("csv", "utf-8", ",")
    assert (registry.counts.rows, registry.counts.used, registry.counts.malformed) == (2, 2, 0)


@pytest.mark.parametrize(("encoding", "detected"), [
    ("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("gbk", "gb18030"),
    ("gb18030", "gb18030"), ("utf-16", "utf-16")])
def test_chinese_exports_are_read_in_each_encoding(tmp_path: Path, encoding: str,
                                                   detected: str) -> None:
    """An export with the Chinese headers and statuses reads the same whether it was
    saved as UTF-8, UTF-8 with a BOM, GBK, GB 18030 or UTF-16: the encoding is detected."""
    text = (f"{CHINESE_HEADER}\n{P1},bldg-0001,三单元301,2024年1月5日,,有效\n"
            f"{P2},bldg-0001,302,2024/02/01,2025.12.31,过期\n"
            f"{P3},bldg-0002,1号楼,20240301,,注销\n{permit(7)},bldg-0002,,,,迁出\n")
    registry, found = read(write(tmp_path / "r.csv", text, encoding))
    assert registry.encoding == detected
    assert [(r.permit, r.unit, r.status) for r in rows_only(found)] == [
        (P1, "三单元301", "active"), (P2, "302", "lapsed"), (P3, "1号楼", "cancelled"),
        (permit(7), None, "moved_out")]
    assert rows_only(found)[0].registered_day == day_number(date(2024, 1, 5))


def test_a_named_encoding_is_used_and_a_wrong_one_is_refused(tmp_path: Path) -> None:
    """``--encoding gbk`` reads a GBK file; naming UTF-8 for it stops with a message that
    says to give the right encoding, and an unknown name is refused."""
    path = write(tmp_path / "r.csv", f"{CHINESE_HEADER}\n{P1},bldg-0001,三单元,,,有效\n",
                 "gbk")
    assert rows_only(read(path, encoding="gbk")[1])[0].unit == "三单元"
    with pytest.raises(RegistryError, match="give the right --encoding"):
        read(path, encoding="utf-8")
    with pytest.raises(RegistryError, match="not an encoding"):
        read(path, encoding="klingon")


def test_an_xlsx_workbook_is_read_with_cells_of_every_type(tmp_path: Path) -> None:
    """An .xlsx export is read from its first sheet: date cells, numbers for units and
    dates (YYYYMMDD, an Excel serial), and row numbers as the sheet shows them."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(["流动人口登记表"])
    sheet.append(CHINESE_HEADER.split(","))
    sheet.append([P1, "bldg-0001", 301, datetime(2024, 1, 5), datetime(2027, 12, 31), "有效"])
    sheet.append([])
    sheet.append([P2, "bldg-0001", "302", 20240201, 46022, "迁出"])
    book.save(tmp_path / "r.xlsx")
    registry, found = read(tmp_path / "r.xlsx")
    assert rows_only(found) == [
        Row(3, P1, "bldg-0001", "301", "active", day_number(date(2024, 1, 5)),
            day_number(date(2027, 12, 31))),
        Row(5, P2, "bldg-0001", "302", "moved_out", day_number(date(2024, 2, 1)),
            day_number(date(2025, 12, 31)))]
    assert (registry.format, registry.encoding, registry.header_line) == ("xlsx", None, 2)
    assert registry.counts.blank == 1


def test_a_permit_stored_as_an_xlsx_number_is_malformed(tmp_path: Path) -> None:
    """A permit number typed into Excel as a number has lost its last digits: the row is
    reported, with the reason, rather than matched wrongly."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(ENGLISH_HEADER.split(","))
    sheet.append([440524188001010014, "bldg-0001", None, None, None, "active"])
    book.save(tmp_path / "r.xlsx")
    (bad,) = read(tmp_path / "r.xlsx")[1]
    assert isinstance(bad, Malformed) and bad.line == 2
    assert "stored as a number" in bad.reason


@pytest.mark.parametrize("header", [
    "Permit Number", " PERMIT_NUMBER ", "permit-number", FULL_WIDTH, "证件号码",
    "身份证号码", "公民身份号码", "\ufeffpermit_number"])
def test_header_variants_are_recognised(tmp_path: Path, header: str) -> None:
    """The permit column is found whatever the case, spacing, hyphens or full-width forms
    of its English name, and under its usual Chinese names."""
    path = write(tmp_path / "r.csv", f"{header},Building,状态\n{P1},bldg-0001,active\n")
    assert rows_only(read(path)[1])[0].permit == P1


def test_title_lines_before_the_header_are_passed_over(tmp_path: Path) -> None:
    """Lines before the header (a title, an export date) are not data: the header is
    found below them and line numbers stay those of the file."""
    path = write(tmp_path / "r.csv", "某某派出所 流动人口登记,,\n导出日期 2026-06-01,,\n\n"
                 f"{CHINESE_HEADER}\n{P1},bldg-0001,301,,,有效\n")
    registry, found = read(path)
    assert registry.header_line == 4
    assert rows_only(found)[0].line == 5


def test_a_file_without_the_required_columns_is_refused_naming_them(tmp_path: Path) -> None:
    """No header among the first rows names permit_number, building and status: the
    whole file is refused with what was found and how to map it."""
    lines = "\n".join(f"name{i},address{i}" for i in range(HEADER_SEARCH_ROWS + 2))
    with pytest.raises(RegistryError, match="permit_number, building, status") as caught:
        read(write(tmp_path / "r.csv", lines + "\n"))
    assert "mapping file" in str(caught.value)


@pytest.mark.parametrize(("delimiter", "name"), [("\t", "tab"), (";", "semicolon"),
                                                  ("|", "bar")])
def test_the_delimiter_is_detected(tmp_path: Path, delimiter: str, name: str) -> None:
    """Tab-, semicolon- and bar-separated exports are read like comma-separated ones."""
    del name
    path = write(tmp_path / "r.csv", f"{CHINESE_HEADER.replace(',', delimiter)}\n"
                 + delimiter.join([P1, "bldg-0001", "301", "", "", "有效"]) + "\n")
    registry, found = read(path)
    assert registry.delimiter == delimiter
    assert rows_only(found)[0].unit == "301"


def test_a_mapping_file_names_other_columns_statuses_and_formats(tmp_path: Path) -> None:
    """Another export's headers, status words, date format, delimiter and header line
    are named in a TOML mapping file and then read like the documented columns."""
    mapping = tmp_path / "map.toml"
    mapping.write_text('[columns]\npermit_number = "公民身份号码(身份证)"\nbuilding = "小区编码"\n'
                       'unit = "室"\nstatus = "人员状态"\nvalid_until = "居住证到期"\n'
                       '[status]\n"在住" = "active"\n"已离开" = "moved_out"\n'
                       '[read]\ndelimiter = ";"\nheader_line = 2\n'
                       'date_formats = ["%d.%m.%Y"]\n', "utf-8")
    path = write(tmp_path / "r.csv", "x;y;z;w;v\n"
                 "公民身份号码(身份证);小区编码;室;人员状态;居住证到期\n"
                 f"{P1};BLDG-1;301;在住;31.12.2027\n{P2};bldg-1;302;已离开;\n", "gbk")
    registry, found = read(path, mapping=load_mapping(mapping))
    assert [(r.permit, r.building, r.unit, r.status, r.valid_until_day)
            for r in rows_only(found)] == [
        (P1, "bldg-1", "301", "active", day_number(date(2027, 12, 31))),
        (P2, "bldg-1", "302", "moved_out", None)]
    assert registry.header_line == 2


@pytest.mark.parametrize(("text", "problem"), [
    ("[colums]\n", "unknown section [colums]"),
    ('[columns]\npermit = "x"\n', "columns.permit: unknown key"),
    ('[status]\n"在住" = "living"\n', 'status.在住 = \'living\''),
    ("[read]\nheader_line = 0\n", "read.header_line"),
    ('[read]\ndelimiter = ",,"\n', "read.delimiter: one character"),
    ("[columns\n", "not TOML"),
])
def test_a_wrong_mapping_file_is_refused_naming_the_key(tmp_path: Path, text: str,
                                                        problem: str) -> None:
    """Every key of a mapping file is checked before anything is read: an unknown
    section or key, a status that is none of the four, a bad header line or delimiter,
    or a file that is no TOML is refused with the file and the key."""
    mapping = tmp_path / "map.toml"
    mapping.write_text(text, "utf-8")
    with pytest.raises(RegistryError, match=r"map\.toml") as caught:
        load_mapping(mapping)
    assert problem in str(caught.value)


def test_malformed_rows_are_reported_with_their_line_numbers_and_counted(
        tmp_path: Path) -> None:
    """Each row that cannot be used is reported with its line in the file (a quoted
    field spanning two lines counts both) and the reason, without the permit number,
    and counted; blank lines are counted apart; the good rows around them are read."""
    bad_check = P1[:-1] + "5"
    path = write(tmp_path / "r.csv", f"{ENGLISH_HEADER}\n"
                 f"{P1},bldg-0001,\"301\nnorth\",,,active\n"    # lines 2-3, good
                 f"{bad_check},bldg-0001,302,,,active\n"        # 4
                 f"{P2},,303,,,active\n"                        # 5
                 f"{P3},bldg-0001,304,,,living\n"               # 6
                 f"{permit(1)},bldg-0001,305,2024-13-01,,active\n"  # 7
                 "\n"                                           # 8, blank
                 f"{permit(2)},bldg-0001,306,,,active,extra\n"  # 9
                 f",bldg-0001,307,,,active\n"                   # 10
                 f"{permit(3)},bldg-0001,308,,2027-01-01,cancelled\n")  # 11, good
    registry, found = read(path)
    malformed = [r for r in found if isinstance(r, Malformed)]
    assert [(m.line, m.reason.split(":")[0]) for m in malformed] == [
        (4, "permit_number"), (5, "building"), (6, "status"), (7, "registered_on"),
        (9, "7 cells, but the header names 6"), (10, "permit_number")]
    assert "check_mismatch" in malformed[0].reason
    assert all(bad_check not in m.reason for m in malformed)
    good = [r for r in found if isinstance(r, Row)]
    assert [(r.line, r.unit) for r in good] == [(2, "301 north"), (11, "308")]
    counts = registry.counts
    assert (counts.rows, counts.used, counts.malformed, counts.blank) == (8, 2, 6, 1)
    assert counts.malformed_rows == malformed


def test_only_the_documented_columns_are_read(tmp_path: Path) -> None:
    """The other columns of an export (a name, a birth date, an address) are never taken
    into a row."""
    path = write(tmp_path / "r.csv", "姓名,证件号码,出生日期,户籍地址,房屋编号,状态\n"
                 f"张三,{P1},1949-12-31,北京市朝阳区,bldg-0001,有效\n")
    (row,) = rows_only(read(path)[1])
    assert "张三" not in repr(row) and "北京" not in repr(row)


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-01-31", date(2026, 1, 31)), ("2026-01-31 08:00:00", date(2026, 1, 31)),
    ("2026-01-31T08:00", date(2026, 1, 31)), ("2026/1/31", date(2026, 1, 31)),
    ("2026.01.31", date(2026, 1, 31)), ("20260131", date(2026, 1, 31)),
    ("2026年1月31日", date(2026, 1, 31))])
def test_dates_are_read_in_the_forms_exports_write(text: str, expected: date) -> None:
    """ISO dates (with or without a time), slashes, dots, eight digits and the Chinese
    year-month-day form all give the same date."""
    assert parse_date(text) == expected


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    """A registry path that is no file is refused before anything else."""
    with pytest.raises(RegistryError, match="no such file"):
        RegistryFile(tmp_path / "missing.csv")


def test_an_unreadable_xlsx_is_refused(tmp_path: Path) -> None:
    """A file named .xlsx that is no workbook is refused with the file's name."""
    (tmp_path / "r.xlsx").write_bytes(codecs.BOM_UTF8 + b"not a workbook")
    with pytest.raises(RegistryError, match=r"not a readable \.xlsx"):
        read(tmp_path / "r.xlsx")
