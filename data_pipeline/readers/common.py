"""Helpers shared by the readers: line iteration over plain or gzip files, field parsers and the
bad-row policy.

Field parsers raise `FieldError(field, message)` without knowing the file or line; the reader's row loop
knows both and turns it into a `DataError`, so the parsers stay tiny and fast on million-row files.
"""
from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from data_pipeline.schema import DataError, Dataset, Events, Item, rating_action


class FieldError(Exception):
    """A bad field in the current row; the row loop adds path and line and hands it to `RowErrors`."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name, self.message = field_name, message


class RowErrors:
    """Bad-row policy: raise the `DataError`, or (skip_bad_rows) count it per file and go on."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: dict[str, int] = {}

    def handle(self, path: str | Path, line: int, err: FieldError) -> None:
        if not self.skip:
            raise DataError(path, line, err.field_name, err.message)
        self.counts[str(path)] = self.counts.get(str(path), 0) + 1

    def skipped_in(self, path: str | Path) -> int:
        return self.counts.get(str(path), 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def notes(self) -> list[str]:
        return [f"skipped {n} bad rows in {path}" for path, n in self.counts.items()]


def open_binary(path: Path) -> IO[bytes]:
    """Plain or gzip file, chosen by the .gz suffix. The extra buffer matters: GzipFile's own readline
    is Python code and costs ~0.1 s per million lines more."""
    if path.suffix == ".gz":
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _decoded_lines(path: Path, encoding: str, errors: RowErrors) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its newline). Decoding line by line, not through a text stream,
    so an undecodable byte is reported with its line number instead of a bare UnicodeDecodeError."""
    with open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode(encoding)
            except UnicodeDecodeError as e:
                errors.handle(path, number, FieldError("encoding", f"not valid {encoding}: {e.reason}"))


def iter_lines(path: Path, encoding: str, errors: RowErrors) -> Iterator[tuple[int, str]]:
    """(line number, text without newline) for every non-blank line. Blank lines hold no data (a trailing
    newline at the end of a file is common), so skipping them loses nothing."""
    for number, text in _decoded_lines(path, encoding, errors):
        text = text.rstrip("\r\n")
        if text.strip():
            yield number, text


def iter_csv(path: Path, encoding: str, errors: RowErrors) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) per CSV record via the csv module (titles hold quoted commas). Raw lines keep
    their newlines so quoted multi-line fields survive; the line number is where the record ends."""
    current = [0]

    def lines() -> Iterable[str]:
        for number, text in _decoded_lines(path, encoding, errors):
            current[0] = number
            yield text

    reader = csv.reader(lines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            errors.handle(path, current[0], FieldError("csv", str(e)))
            continue
        if row:
            yield current[0], row


def after_header(rows: Iterator[tuple[int, list[str]]], path: Path, expected: tuple[str, ...]
                 ) -> Iterator[tuple[int, list[str]]]:
    """Check the first row is `expected` and return the remaining rows. A wrong header means the columns
    may mean something else, so it always raises, even with skip_bad_rows."""
    first = next(rows, None)
    if first is None:
        raise DataError(path, 1, "header", f"empty file, expected columns {list(expected)}")
    if tuple(first[1]) != expected:
        raise DataError(path, first[0], "header", f"expected columns {list(expected)}, got {first[1]}")
    return rows


def split_fields(text: str, sep: str, count: int) -> list[str]:
    fields = text.split(sep)
    if len(fields) != count:
        raise FieldError("row", f"expected {count} {sep!r}-separated fields, got {len(fields)}")
    return fields


def need_id(text: str, field_name: str) -> str:
    """A non-empty string id (Amazon reviewerID / ASIN)."""
    if not text or not text.strip():
        raise FieldError(field_name, "empty id")
    return text


def int_id(text: str, field_name: str, cache: dict[str, str] | None = None) -> str:
    """An integer id, returned normalised as str(int) so '007' in one file joins '7' in another.
    `cache` (raw text -> id) saves the int/str round trip on ids that repeat across a million rows."""
    if cache is not None:
        found = cache.get(text)
        if found is None:
            found = cache[text] = str(non_neg_int(text, field_name))
        return found
    return str(non_neg_int(text, field_name))


def non_neg_int(text: str, field_name: str) -> int:
    if text.isdecimal():  # fast path: always a valid non-negative int() literal
        return int(text)
    if not text.strip():
        raise FieldError(field_name, "empty value")
    try:
        value = int(text)
    except ValueError:
        raise FieldError(field_name, f"not an integer: {text!r}") from None
    if value < 0:
        raise FieldError(field_name, f"negative value {value}")
    return value


def json_int(value: object, field_name: str) -> int:
    """A non-negative JSON integer (bool is an int subclass in Python, so reject it explicitly)."""
    if value is None:
        raise FieldError(field_name, "missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field_name, f"not an integer: {value!r}")
    if value < 0:
        raise FieldError(field_name, f"negative value {value}")
    return value


def check_rating(value: float, field_name: str) -> int:
    """Rating -> action code; 0.5..5 is the only valid range (NaN fails the comparison too)."""
    if not 0.5 <= value <= 5.0:
        raise FieldError(field_name, f"rating {value!r} outside 0.5..5")
    return rating_action(value)


def rating_code(text: str, field_name: str, cache: dict[str, int]) -> int:
    """Rating text -> action code, memoised on the raw text: a file has only a handful of distinct
    rating strings, and rating_action's np.ceil costs ~1 us a call on a million rows."""
    code = cache.get(text)
    if code is None:
        try:
            value = float(text)
        except ValueError:
            raise FieldError(field_name, f"not a number: {text!r}") from None
        code = cache[text] = check_rating(value, field_name)
    return code


def require_files(folder: Path, names: Iterable[str], what: str) -> None:
    """FileNotFoundError naming the first missing path and every file the layout needs."""
    names = list(names)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: raw folder {folder} does not exist; expected files {names}")
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{what}: missing {folder / name}; expected files {names} in {folder}")


class Columns:
    """Event columns as Python lists (plus each event's source line), turned into arrays once at the end:
    one Events.from_columns call is far cheaper than growing arrays row by row."""

    def __init__(self) -> None:
        self.user: list[str] = []
        self.item: list[str] = []
        self.ts: list = []
        self.action: list[int] = []
        self.query: list[str] = []
        self.line: list[int] = []

    def __len__(self) -> int:
        return len(self.user)

    def add(self, user: str, item: str, ts, action: int, line: int, query: str = "") -> None:
        self.user.append(user)
        self.item.append(item)
        self.ts.append(ts)
        self.action.append(action)
        self.query.append(query)
        self.line.append(line)

    def drop(self, indices: set[int]) -> None:
        """Remove rows found bad after the scan (skip_bad_rows only)."""
        for name in ("user", "item", "ts", "action", "query", "line"):
            column = getattr(self, name)
            setattr(self, name, [v for i, v in enumerate(column) if i not in indices])

    def events(self, domain: str, has_timestamps: bool) -> Events:
        return Events.from_columns(self.user, self.item, self.ts, self.action, domain, self.query,
                                   has_timestamps)


def finish(name: str, cols: Columns, domain: str, has_timestamps: bool, catalog: dict[str, Item],
           errors: RowErrors, notes: list[str]) -> Dataset:
    """The Dataset, with the skip counts (and one note per file that had skips) filled in."""
    return Dataset(name=name, events=cols.events(domain, has_timestamps), catalog=catalog,
                   skipped_rows=errors.total, notes=notes + errors.notes())
