"""MovieLens readers: ml-1m (GroupLens .dat layout or the shared rank-only layout), ml-100k and
ml-latest-small. All use domain "movies" and keep events in file order."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipeline.readers.common import (
    Columns,
    FieldError,
    RowErrors,
    after_header,
    finish,
    int_id,
    iter_csv,
    iter_lines,
    non_neg_int,
    rating_code,
    require_files,
    split_fields,
)
from data_pipeline.schema import ACTION_SEARCH_CLICK, DataError, Dataset, Item

DOMAIN = "movies"
_YEAR = re.compile(r"\((\d{4})\)\s*$")
# ml-100k's genre columns, in order, for folders that lack u.genre.
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
ML1M_RANK_HEADER = ("user_id", "movie_id", "rating", "chrono_rank")
Rows = Iterable[tuple[int, list[str]]]


def _split_rows(path: Path, encoding: str, sep: str, errors: RowErrors) -> Iterator[tuple[int, list[str]]]:
    return ((number, text.split(sep)) for number, text in iter_lines(path, encoding, errors))


def _movie(item_id: str, title: str, genres: list[str], **extra) -> Item:
    match = _YEAR.search(title)
    attributes = {"year": int(match.group(1))} if match else {}
    attributes.update(extra)
    return Item(item_id=item_id, domain=DOMAIN, title=title, categories=genres, attributes=attributes)


def _add_movie(catalog: dict[str, Item], item: Item) -> None:
    if item.item_id in catalog:
        raise FieldError("movie_id", f"duplicate movie id {item.item_id}")
    catalog[item.item_id] = item


def _read_catalog(rows: Rows, path: Path, names: tuple[str, str, str], errors: RowErrors) -> dict[str, Item]:
    """movies.dat / movies.csv rows: id, title, '|'-joined genres."""
    catalog: dict[str, Item] = {}
    for line, f in rows:
        try:
            if len(f) != 3:
                raise FieldError("row", f"expected 3 fields, got {len(f)}")
            # ml-latest-small spells "no genre" as a pseudo-genre; an empty list says the same thing.
            genres = [] if f[2] in ("", "(no genres listed)") else f[2].split("|")
            _add_movie(catalog, _movie(int_id(f[0], names[0]), f[1], genres))
        except FieldError as e:
            errors.handle(path, line, e)
    return catalog


def _read_ratings(rows: Rows, path: Path, names: tuple[str, str, str, str], catalog: dict[str, Item],
                  errors: RowErrors, cols: Columns) -> None:
    """user, movie, rating, time (or chrono_rank) rows -> rating events appended to `cols`."""
    ratings: dict[str, int] = {}
    ids: dict[str, str] = {}
    # Bound appends instead of cols.add: this loop runs a million times for ml-1m.
    users, items, times, actions, lines = cols.user.append, cols.item.append, cols.ts.append, \
        cols.action.append, cols.line.append
    for line, f in rows:
        try:
            if len(f) != 4:
                raise FieldError("row", f"expected 4 fields, got {len(f)}")
            user = int_id(f[0], names[0], ids)
            item = int_id(f[1], names[1], ids)
            if item not in catalog:
                raise FieldError(names[1], f"movie {item} is not in the movie catalog")
            action = rating_code(f[2], names[2], ratings)
            ts = non_neg_int(f[3], names[3])
        except FieldError as e:
            errors.handle(path, line, e)
            continue
        users(user)
        items(item)
        times(ts)
        actions(action)
        lines(line)
    cols.query.extend([""] * (len(cols.user) - len(cols.query)))


# ---- ml-1m ---------------------------------------------------------------------------------------------

def read_ml1m(raw: str | Path, skip_bad_rows: bool = False) -> Dataset:
    """MovieLens-1M. GroupLens ratings.dat (real timestamps) wins when present; otherwise the shared
    ratings_notime.tsv.gz layout, whose timestamps are per-user chronological ranks."""
    raw = Path(raw)
    errors = RowErrors(skip_bad_rows)
    if (raw / "ratings.dat").is_file():
        require_files(raw, ["ratings.dat", "movies.dat"], "ml-1m")
        catalog = _read_catalog(_split_rows(raw / "movies.dat", "latin-1", "::", errors), raw / "movies.dat",
                                ("MovieID", "Title", "Genres"), errors)
        cols = Columns()
        _read_ratings(_split_rows(raw / "ratings.dat", "latin-1", "::", errors), raw / "ratings.dat",
                      ("UserID", "MovieID", "Rating", "Timestamp"), catalog, errors, cols)
        return finish("ml-1m", cols, DOMAIN, True, catalog, errors, [])
    if not (raw / "ratings_notime.tsv.gz").is_file():
        problem = "no ratings file in" if raw.is_dir() else "raw folder does not exist:"
        raise FileNotFoundError(f"ml-1m: {problem} {raw}; expected ratings.dat + movies.dat "
                                f"(GroupLens layout) or ratings_notime.tsv.gz + movies.dat")
    require_files(raw, ["ratings_notime.tsv.gz", "movies.dat"], "ml-1m")
    return _read_ml1m_ranked(raw, errors)


def _read_ml1m_ranked(raw: Path, errors: RowErrors) -> Dataset:
    catalog = _read_catalog(_split_rows(raw / "movies.dat", "latin-1", "::", errors), raw / "movies.dat",
                            ("MovieID", "Title", "Genres"), errors)
    path = raw / "ratings_notime.tsv.gz"
    cols = Columns()
    rows = after_header(_split_rows(path, "utf-8", "\t", errors), path, ML1M_RANK_HEADER)
    _read_ratings(rows, path, ML1M_RANK_HEADER, catalog, errors, cols)
    orders, bad = _check_ranks(cols, path, errors)
    notes = [("timestamps are per-user chronological ranks (chrono_rank of ratings_notime.tsv.gz), not "
              "seconds: the source has no absolute times, so time differences carry no meaning")]
    sequences = raw / "sequences_chrono.txt.gz"
    if sequences.is_file():
        # After skipped rows the reference sequences hold items we dropped, so only a subsequence check
        # is possible then.
        exact = errors.total == 0
        _cross_check(sequences, orders, exact)
        notes.append(f"chronological order cross-checked against {sequences.name} for {len(orders)} users"
                     + ("" if exact else " (subsequence check only: bad rows were skipped)"))
    if bad:
        cols.drop(bad)
    return finish("ml-1m", cols, DOMAIN, False, catalog, errors, notes)


def _check_ranks(cols: Columns, path: Path, errors: RowErrors) -> tuple[dict[str, list[str]], set[int]]:
    """Each user's chrono_rank values must be a permutation of 0..n-1. Returns each user's items in
    chronological order and the row indices to drop (skip_bad_rows only)."""
    by_user: dict[str, dict[int, int]] = {}  # user -> rank -> row index
    bad: set[int] = set()
    for idx, (user, rank) in enumerate(zip(cols.user, cols.ts)):
        ranks = by_user.setdefault(user, {})
        if rank in ranks:
            errors.handle(path, cols.line[idx], FieldError(
                "chrono_rank", f"duplicate rank {rank} for user {user} (also on line {cols.line[ranks[rank]]})"))
            bad.add(idx)
        else:
            ranks[rank] = idx
    # Distinct ranks all below n make a permutation of 0..n-1. A skipped row could have belonged to any
    # user and left a gap, so every skipped row widens the bound by one.
    slack = errors.skipped_in(path)
    for user, ranks in by_user.items():
        limit = len(ranks) + slack
        for rank in sorted(r for r in ranks if r >= limit):
            idx = ranks.pop(rank)
            errors.handle(path, cols.line[idx], FieldError(
                "chrono_rank", f"rank {rank} out of range 0..{limit - 1} for user {user}"))
            bad.add(idx)
    orders = {user: [cols.item[idx] for _, idx in sorted(ranks.items())] for user, ranks in by_user.items()}
    return orders, bad


def _cross_check(path: Path, orders: dict[str, list[str]], exact: bool) -> None:
    """Items ordered by chrono_rank must equal sequences_chrono's line for every user. Never skipped:
    this file only verifies, so a mismatch means the rank column itself is suspect."""
    seen: set[str] = set()
    ids: dict[str, str] = {}
    for line, text in iter_lines(path, "utf-8", RowErrors(False)):
        tokens = text.split()
        try:
            user = int_id(tokens[0], "user_id")
            expected = [int_id(t, "movie_id", ids) for t in tokens[1:]]
        except FieldError as e:
            raise DataError(path, line, e.field_name, e.message) from None
        got = orders.get(user)
        if got is None:
            raise DataError(path, line, "user_id", f"user {user} has a sequence but no ratings")
        if exact and got != expected:
            k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise DataError(path, line, "movie_id", (
                f"user {user}: order by chrono_rank differs from this sequence at position {k}: ratings "
                f"give {got[k:k + 1]}, sequence has {expected[k:k + 1]} ({len(got)} vs {len(expected)} items)"))
        remaining = iter(expected)
        if not exact and not all(item in remaining for item in got):
            raise DataError(path, line, "movie_id",
                            f"user {user}: order by chrono_rank is not a subsequence of this sequence")
        seen.add(user)
    missing = [user for user in orders if user not in seen]
    if missing:
        raise ValueError(f"{path}: {len(missing)} users with ratings have no sequence, e.g. user {missing[0]}")


# ---- ml-100k -------------------------------------------------------------------------------------------

def read_ml100k(raw: str | Path, skip_bad_rows: bool = False) -> Dataset:
    raw = Path(raw)
    require_files(raw, ["u.data", "u.item"], "ml-100k")
    errors = RowErrors(skip_bad_rows)
    genres = _read_u_genre(raw / "u.genre") if (raw / "u.genre").is_file() else list(ML100K_GENRES)
    catalog = _read_u_item(raw / "u.item", genres, errors)
    cols = Columns()
    _read_ratings(_split_rows(raw / "u.data", "latin-1", "\t", errors), raw / "u.data",
                  ("user_id", "item_id", "rating", "timestamp"), catalog, errors, cols)
    return finish("ml-100k", cols, DOMAIN, True, catalog, errors, [])


def _read_u_genre(path: Path) -> list[str]:
    """`name|index` lines. Always strict: a bad line would shift every item's genre columns."""
    strict = RowErrors(False)
    by_index: dict[int, str] = {}
    for line, text in iter_lines(path, "latin-1", strict):
        try:
            name, index = split_fields(text, "|", 2)
            by_index[non_neg_int(index, "index")] = name
        except FieldError as e:
            strict.handle(path, line, e)
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(path, 1, "index", f"genre indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _read_u_item(path: Path, genres: list[str], errors: RowErrors) -> dict[str, Item]:
    """id|title|release date|video release date|IMDb URL|one 0/1 flag per genre (Latin-1)."""
    catalog: dict[str, Item] = {}
    for line, f in _split_rows(path, "latin-1", "|", errors):
        try:
            if len(f) != 5 + len(genres):
                raise FieldError("row", f"expected {5 + len(genres)} fields, got {len(f)}")
            flags = f[5:]
            for name, flag in zip(genres, flags):
                if flag not in ("0", "1"):
                    raise FieldError(name, f"genre flag must be 0 or 1, got {flag!r}")
            chosen = [name for name, flag in zip(genres, flags) if flag == "1"]
            _add_movie(catalog, _movie(int_id(f[0], "movie_id"), f[1], chosen,
                                       release_date=f[2], imdb_url=f[4]))
        except FieldError as e:
            errors.handle(path, line, e)
    return catalog


# ---- ml-latest-small -----------------------------------------------------------------------------------

def read_ml_latest_small(raw: str | Path, skip_bad_rows: bool = False) -> Dataset:
    """Ratings as rating events, then tags as search events (the tag text is the query, the tagged movie
    the clicked item): tags are the only user-typed text these datasets have."""
    raw = Path(raw)
    require_files(raw, ["ratings.csv", "movies.csv"], "ml-latest-small")
    errors = RowErrors(skip_bad_rows)
    movies = raw / "movies.csv"
    catalog = _read_catalog(after_header(iter_csv(movies, "utf-8", errors), movies,
                                         ("movieId", "title", "genres")), movies,
                            ("movieId", "title", "genres"), errors)
    cols = Columns()
    names = ("userId", "movieId", "rating", "timestamp")
    ratings = raw / "ratings.csv"
    _read_ratings(after_header(iter_csv(ratings, "utf-8", errors), ratings, names), ratings, names,
                  catalog, errors, cols)
    notes = []
    if (raw / "tags.csv").is_file():
        _read_tags(raw / "tags.csv", catalog, errors, cols)
    else:
        notes.append("no tags.csv: no search events")
    return finish("ml-latest-small", cols, DOMAIN, True, catalog, errors, notes)


def _read_tags(path: Path, catalog: dict[str, Item], errors: RowErrors, cols: Columns) -> None:
    for line, f in after_header(iter_csv(path, "utf-8", errors), path, ("userId", "movieId", "tag", "timestamp")):
        try:
            if len(f) != 4:
                raise FieldError("row", f"expected 4 fields, got {len(f)}")
            user = int_id(f[0], "userId")
            item = int_id(f[1], "movieId")
            if item not in catalog:
                raise FieldError("movieId", f"movie {item} is not in the movie catalog")
            if not f[2].strip():
                raise FieldError("tag", "empty tag")  # an empty query would read as a non-search event
            ts = non_neg_int(f[3], "timestamp")
        except FieldError as e:
            errors.handle(path, line, e)
            continue
        cols.add(user, item, ts, ACTION_SEARCH_CLICK, line, query=f[2])
