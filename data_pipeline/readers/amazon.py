"""Amazon 2014 readers: the original SNAP 5-core files, or the shared interactions.tsv.gz + items.jsonl.gz
layout (P5/S3-Rec split). The domain is the category, lowercased ("beauty", "sports")."""
from __future__ import annotations

import ast
import json
from pathlib import Path

from data_pipeline.readers.common import (
    Columns,
    FieldError,
    RowErrors,
    after_header,
    check_rating,
    finish,
    iter_lines,
    json_int,
    need_id,
    non_neg_int,
    require_files,
)
from data_pipeline.schema import ACTION_INTERACT, Dataset, Item

TSV_HEADER = ("user_id", "item_id", "timestamp", "p5_user_id", "p5_item_id", "position")
_TEXT_FIELDS = ("title", "brand", "description", "categories")


def read_amazon(raw: str | Path, category: str, skip_bad_rows: bool = False) -> Dataset:
    """Amazon 5-core reviews of one category. interactions.tsv.gz (shared layout) wins when present,
    else the SNAP files found by the glob reviews_*_5.json.gz."""
    raw = Path(raw)
    domain = category.lower()
    if not raw.is_dir():
        raise FileNotFoundError(f"amazon-{domain}: raw folder {raw} does not exist; expected interactions.tsv.gz"
                                f" + items.jsonl.gz, or reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz")
    errors = RowErrors(skip_bad_rows)
    if (raw / "interactions.tsv.gz").is_file():
        return _read_tsv_layout(raw, domain, errors)
    return _read_snap_layout(raw, domain, errors)


def _catalog_gaps(cols: Columns, catalog: dict[str, Item], domain: str, source: str) -> list[str]:
    """Reviewed items missing from the metadata still get an (id-only) catalog entry, counted in a note."""
    missing = {item for item in cols.item if item not in catalog}
    for item in sorted(missing):
        catalog[item] = Item(item_id=item, domain=domain)
    return [f"{len(missing)} reviewed items have no entry in {source}; catalog holds id-only items"] if missing else []


def _item(item_id: str, domain: str, record: dict) -> Item:
    """Text fields into Item fields (null -> empty), every other non-null field into attributes."""
    text = {}
    for key in ("title", "brand", "description"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise FieldError(key, f"expected a string, got {type(value).__name__}")
        text[key] = value or ""
    categories = record.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise FieldError("categories", f"expected a list of strings, got {categories!r:.80}")
    attributes = {k: v for k, v in record.items() if k not in _TEXT_FIELDS and v is not None}
    return Item(item_id=item_id, domain=domain, categories=categories, attributes=attributes, **text)


def _json_object(text: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError as e:
        raise FieldError("json", f"undecodable JSON: {e}") from None
    if not isinstance(record, dict):
        raise FieldError("json", f"expected a JSON object, got {type(record).__name__}")
    return record


def _string_id(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FieldError(key, "missing" if value is None else f"expected a string id, got {value!r}")
    return need_id(value, key)


# ---- shared layout: interactions.tsv.gz + items.jsonl.gz -----------------------------------------------

def _read_tsv_layout(raw: Path, domain: str, errors: RowErrors) -> Dataset:
    require_files(raw, ["interactions.tsv.gz", "items.jsonl.gz"], f"amazon-{domain}")
    path = raw / "interactions.tsv.gz"
    cols, positions, missing_ts = _read_interactions(path, errors)
    notes: list[str] = []
    has_timestamps = missing_ts == 0
    if not has_timestamps:
        # One empty timestamp makes times incomparable across users, so use the rank for all events.
        cols.ts = positions
        notes.append(f"{missing_ts} events have no timestamp in {path.name}: timestamps are per-user "
                     f"positions (chronological ranks) for all events")
    catalog = _read_items_jsonl(raw / "items.jsonl.gz", domain, errors)
    if catalog and not any(item.title for item in catalog.values()):
        # amazon-sports: no original text survives; idgenrec_textual_id (kept in attributes) is
        # model-generated keywords, not metadata.
        notes.append("no item titles; attributes['idgenrec_textual_id'] is model-generated text")
    notes += _catalog_gaps(cols, catalog, domain, "items.jsonl.gz")
    return finish(f"amazon-{domain}", cols, domain, has_timestamps, catalog, errors, notes)


def _read_interactions(path: Path, errors: RowErrors) -> tuple[Columns, list[int], int]:
    """Rows in file order. Each user's `position` must run 0,1,2,... and timestamps (where present) must
    not decrease: both say the file is in chronological order, which the leave-one-out split relies on."""
    cols, positions, missing_ts = Columns(), [], 0
    last: dict[str, tuple[int, int | None]] = {}  # user -> (last position, last timestamp)
    rows = ((n, text.split("\t")) for n, text in iter_lines(path, "utf-8", errors))
    for line, f in after_header(rows, path, TSV_HEADER):
        try:
            if len(f) != 6:
                raise FieldError("row", f"expected 6 fields, got {len(f)}")
            user, item = need_id(f[0], "user_id"), need_id(f[1], "item_id")
            ts = non_neg_int(f[2], "timestamp") if f[2] else None
            non_neg_int(f[3], "p5_user_id")  # validated only: the raw ids are the canonical ones
            non_neg_int(f[4], "p5_item_id")
            position = non_neg_int(f[5], "position")
            prev_position, prev_ts = last.get(user, (-1, None))
            _check_order(position, prev_position, ts, prev_ts, errors.skip and errors.total > 0)
        except FieldError as e:
            errors.handle(path, line, e)
            continue
        last[user] = (position, prev_ts if ts is None else ts)
        missing_ts += ts is None
        cols.add(user, item, ts, ACTION_INTERACT, line)
        positions.append(position)
    return cols, positions, missing_ts


def _check_order(position: int, prev_position: int, ts: int | None, prev_ts: int | None, gaps_ok: bool) -> None:
    # After a skipped row the user's next position legitimately jumps, so only require an increase then.
    if position != prev_position + 1 and not (gaps_ok and position > prev_position):
        raise FieldError("position", f"expected position {prev_position + 1} for this user, got {position}")
    if ts is not None and prev_ts is not None and ts < prev_ts:
        raise FieldError("timestamp", f"{ts} is earlier than the user's previous timestamp {prev_ts}")


def _read_items_jsonl(path: Path, domain: str, errors: RowErrors) -> dict[str, Item]:
    catalog: dict[str, Item] = {}
    for line, text in iter_lines(path, "utf-8", errors):
        try:
            record = _json_object(text)
            item_id = _string_id(record, "item_id")
            if item_id in catalog:
                raise FieldError("item_id", f"duplicate item {item_id}")
            record.pop("item_id")
            catalog[item_id] = _item(item_id, domain, record)
        except FieldError as e:
            errors.handle(path, line, e)
    return catalog


# ---- SNAP layout: reviews_<Cat>_5.json.gz + meta_<Cat>.json.gz -----------------------------------------

def _find_snap_files(raw: Path, domain: str) -> tuple[Path, Path]:
    """The one reviews_<Cat>_5.json.gz in the folder (or, if several, the one whose category starts with
    the domain: "sports" -> Sports_and_Outdoors) and its meta_<Cat>.json.gz."""
    found = sorted(raw.glob("reviews_*_5.json.gz"))
    key = domain.replace("-", "_")
    matching = found if len(found) == 1 else [p for p in found if p.name[8:].lower().startswith(key)]
    if len(matching) != 1:
        raise FileNotFoundError(
            f"amazon-{domain}: expected interactions.tsv.gz + items.jsonl.gz, or exactly one "
            f"reviews_<Cat>_5.json.gz (+ meta_<Cat>.json.gz) matching '{domain}' in {raw}; "
            f"found {[p.name for p in found]}")
    reviews = matching[0]
    meta = raw / f"meta_{reviews.name[len('reviews_'):-len('_5.json.gz')]}.json.gz"
    if not meta.is_file():
        raise FileNotFoundError(f"amazon-{domain}: missing {meta}; expected files {[reviews.name, meta.name]}")
    return reviews, meta


def _read_snap_layout(raw: Path, domain: str, errors: RowErrors) -> Dataset:
    reviews, meta = _find_snap_files(raw, domain)
    cols = Columns()
    ratings: dict[str, int] = {}
    for line, text in iter_lines(reviews, "utf-8", errors):
        try:
            record = _json_object(text)
            user, item = _string_id(record, "reviewerID"), _string_id(record, "asin")
            ts = json_int(record.get("unixReviewTime"), "unixReviewTime")
            action = _review_action(record.get("overall"), ratings)
        except FieldError as e:
            errors.handle(reviews, line, e)
            continue
        cols.add(user, item, ts, action, line)
    catalog = _read_snap_meta(meta, domain, errors)
    notes = _catalog_gaps(cols, catalog, domain, meta.name)
    return finish(f"amazon-{domain}", cols, domain, True, catalog, errors, notes)


def _review_action(overall: object, cache: dict) -> int:
    if overall is None:
        return ACTION_INTERACT  # a review without a star rating is still an interaction
    if isinstance(overall, bool) or not isinstance(overall, (int, float)):
        raise FieldError("overall", f"not a number: {overall!r}")
    if overall not in cache:
        cache[overall] = check_rating(float(overall), "overall")
    return cache[overall]


def _parse_meta_line(text: str) -> dict:
    """SNAP meta lines are Python dict literals (single quotes), some mirrors rewrote them as JSON.
    json.loads is tried first only because it is much faster and fails at once on a single quote; any
    line valid in both parses to the same dict."""
    try:
        record = json.loads(text)
    except ValueError:
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise FieldError("json", f"neither a Python dict literal nor JSON: {e}") from None
    if not isinstance(record, dict):
        raise FieldError("json", f"expected an object, got {type(record).__name__}")
    return record


def _read_snap_meta(path: Path, domain: str, errors: RowErrors) -> dict[str, Item]:
    catalog: dict[str, Item] = {}
    for line, text in iter_lines(path, "utf-8", errors):
        try:
            record = _parse_meta_line(text)
            item_id = _string_id(record, "asin")
            if item_id in catalog:
                raise FieldError("asin", f"duplicate item {item_id}")
            catalog[item_id] = _item(item_id, domain, _snap_record(record))
        except FieldError as e:
            errors.handle(path, line, e)
    return catalog


def _snap_record(record: dict) -> dict:
    """SNAP meta -> the shared layout's field names. categories is a list of root-first paths: the first
    path becomes Item.categories (as in items.jsonl.gz), all paths stay in attributes['category_paths'].
    'related' (also-bought/also-viewed lists) is dropped: it is large and built from other users'
    future purchases, which would leak into item features."""
    paths = record.get("categories") or []
    if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
        raise FieldError("categories", f"expected a list of category paths, got {paths!r:.80}")
    out = {k: v for k, v in record.items() if k not in ("asin", "categories", "related", "salesRank")}
    out["categories"] = [str(c) for c in paths[0]] if paths else []
    out["category_paths"] = paths
    if record.get("salesRank") is not None:
        out["sales_rank"] = record["salesRank"]
    return out
