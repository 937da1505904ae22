"""Several domains in one shard set, MLoRA's two setups: several sources merged (Amazon Beauty + Sports),
or one source whose users are split into groups (ML-1M by age band or gender, from users.dat).

Both are pure functions Dataset -> Dataset that run after the readers and before `search_data.apply`;
`write_shards` then maps the domain names to ids (sorted names) as it does for any dataset.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from data_pipeline.readers.common import FieldError, RowErrors, int_id, iter_lines, split_fields
from data_pipeline.schema import DataError, Dataset, Events, Item

EVENT_COLUMNS = ("user_id", "item_id", "timestamp", "action", "domain", "query")
# ML-1M README, users.dat: "Age is chosen from the following ranges" (code -> band); names are domain
# names, so they must be identifiers an adapter file can carry (adapters/<domain>.safetensors).
AGE_BANDS = {"1": "age_under18", "18": "age18_24", "25": "age25_34", "35": "age35_44", "45": "age45_49",
             "50": "age50_55", "56": "age56plus"}
GENDERS = {"F": "gender_f", "M": "gender_m"}
USER_GROUPS = ("age", "gender")
USERS_FIELDS = ("UserID", "Gender", "Age", "Occupation", "Zip-code")


# ---- several sources -> one dataset ----------------------------------------------------------------------
def merge_datasets(parts: list[tuple[str, Dataset]]) -> Dataset:
    """(source name, Dataset) pairs -> one Dataset: events concatenated in `parts` order, one item space,
    one user space (the same raw user id in two sources is one user), catalogs merged.

    write_shards sorts each user's events by time with a stable sort, so a shared user's events interleave
    by timestamp and same-time events keep this concatenation order: the first source first, then file
    order. Each source keeps its own domain names (amazon-beauty -> "beauty")."""
    if not parts:
        raise ValueError("merge_datasets: no datasets to merge")
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"merge_datasets: a source is listed twice: {names}")
    for name, ds in parts:
        if ds.search_info:  # held-out queries are drawn over the whole set: apply search after merging
            raise ValueError(f"merge_datasets: {name} already has search events; merge first, then search")
    _check_disjoint_domains(parts)
    shared = _shared_users(parts)
    has_ts = _common_timestamps(parts, shared)
    events = Events(*(np.concatenate([getattr(ds.events, c) for _, ds in parts]) for c in EVENT_COLUMNS),
                    has_timestamps=has_ts)
    sizes = " + ".join(f"{name} ({len(ds.events):,} events)" for name, ds in parts)
    notes = [f"{name}: {n}" for name, ds in parts for n in ds.notes]
    notes.append(f"merged {sizes}: {shared:,} users appear in more than one source; their events interleave "
                 f"by {'timestamp' if has_ts else 'rank'}, same-time events in source order ({names[0]} first)")
    return Dataset(name="+".join(names), events=events, catalog=_merged_catalog(parts),
                   skipped_rows=sum(ds.skipped_rows for _, ds in parts), notes=notes)


def _check_disjoint_domains(parts: list[tuple[str, Dataset]]) -> None:
    """Each source brings its own domains. Two sources with one domain name (ml-1m and ml-100k are both
    "movies") would pool their per-domain metrics and adapters, and such sources number their users and
    items from 1 each, so "user 1" of both would become one user: refused."""
    seen: dict[str, str] = {}  # domain name -> the first source that has it
    for name, ds in parts:
        for domain in sorted(set(ds.events.domain.tolist())):
            first = seen.setdefault(domain, name)
            if first != name:
                raise ValueError(f"sources {first} and {name} both have domain {domain!r}: merged sources "
                                 "need distinct domains (and ids that mean the same user in both)")


def _shared_users(parts: list[tuple[str, Dataset]]) -> int:
    """Users (raw ids) with events in more than one source."""
    per_source = [np.unique(ds.events.user_id.astype(str)) for _, ds in parts]
    _, count = np.unique(np.concatenate(per_source), return_counts=True)
    return int((count > 1).sum())


def _common_timestamps(parts: list[tuple[str, Dataset]], shared: int) -> bool:
    """True when every source has real timestamps. Seconds and per-user ranks are not comparable, so a
    mix is refused; rank-only sources merge only when no user is in two of them (ranks of two sources
    say nothing about which event came first)."""
    timed = [name for name, ds in parts if ds.events.has_timestamps]
    ranked = [name for name, ds in parts if not ds.events.has_timestamps]
    if timed and ranked:
        raise ValueError(f"cannot merge sources with timestamps ({', '.join(timed)}) and rank-only sources "
                         f"({', '.join(ranked)}): seconds and per-user ranks are not comparable")
    if ranked and shared:
        raise ValueError(f"cannot merge rank-only sources {', '.join(ranked)}: {shared} users are in more "
                         "than one, and per-user ranks of two sources cannot be interleaved")
    return not ranked


def _merged_catalog(parts: list[tuple[str, Dataset]]) -> dict[str, Item]:
    """One item space. The sources' domains are disjoint, so an item id in two of them is a collision
    (Beauty and Sports share 0 of their 30,458 ASINs): an error naming both sources and domains."""
    catalog: dict[str, Item] = {}
    owner: dict[str, tuple[str, str]] = {}  # item id -> (source, domain) of the source that has it
    for name, ds in parts:
        for item, domain in _item_domains(ds).items():
            first = owner.setdefault(item, (name, domain))
            if first[0] != name:
                raise ValueError(f"item id {item!r} is in {first[0]} (domain {first[1]!r}) and in {name} "
                                 f"(domain {domain!r}): item ids must be unique across the merged sources")
        catalog.update(ds.catalog)
    return catalog


def _item_domains(ds: Dataset) -> dict[str, str]:
    """Raw item id -> domain: the catalog's, else the domain of the item's first event."""
    items, first = np.unique(ds.events.item_id.astype(str), return_index=True)
    out = {str(i): str(d) for i, d in zip(items, ds.events.domain[first])}
    out.update((item, entry.domain) for item, entry in ds.catalog.items())
    return out


# ---- one source, users split into groups -----------------------------------------------------------------
def domains_by_user_group(ds: Dataset, users_file: str | Path, by: str) -> Dataset:
    """Every event's domain becomes its user's group from ML-1M users.dat: by='age' -> AGE_BANDS names,
    by='gender' -> GENDERS names. The catalog keeps its own Item.domain ("movies"): a movie is rated by
    every group, so it has no single domain (write_shards marks it -1 in the manifest's item_domain)."""
    if by not in USER_GROUPS:
        raise ValueError(f"domains_by_user_group: by must be one of {USER_GROUPS}, got {by!r}")
    groups = read_user_groups(users_file, by)
    users, inverse = np.unique(ds.events.user_id.astype(str), return_inverse=True)  # (U,), (E,)
    missing = [u for u in users.tolist() if u not in groups]
    if missing:
        raise DataError(users_file, 0, "UserID", f"{len(missing)} users of the {ds.name} events have no row "
                        f"in this file (line 0 = the whole file), e.g. {missing[:5]}")
    domain = np.array([groups[u] for u in users.tolist()], dtype=object)[inverse]  # (E,)
    note = (f"domains are user groups by {by} from {Path(users_file).name} ({len(set(groups.values()))} groups "
            f"in the file); the catalog keeps each item's own domain")
    return replace(ds, events=replace(ds.events, domain=domain), notes=[*ds.notes, note])


def read_user_groups(users_file: str | Path, by: str) -> dict[str, str]:
    """users.dat (UserID::Gender::Age::Occupation::Zip-code, latin-1) -> raw user id -> group name.
    Always strict: a user whose row is skipped would have no group, so a bad line is a DataError."""
    path = Path(users_file)
    if not path.is_file():
        raise FileNotFoundError(f"domain_by={by}: missing {path} (ML-1M users.dat with the user groups)")
    errors, cache = RowErrors(skip=False), {}
    groups: dict[str, str] = {}
    for number, text in iter_lines(path, "latin-1", errors):
        try:
            user, group = _user_group(text, by, cache)
            if user in groups:
                raise FieldError("UserID", f"duplicate user id {user}")
            groups[user] = group
        except FieldError as e:
            errors.handle(path, number, e)  # raises: RowErrors(skip=False)
    return groups


def _user_group(text: str, by: str, cache: dict) -> tuple[str, str]:
    user_id, gender, age, occupation, _zip = split_fields(text, "::", len(USERS_FIELDS))
    user = int_id(user_id, "UserID", cache)
    if gender not in GENDERS:
        raise FieldError("Gender", f"expected one of {sorted(GENDERS)}, got {gender!r}")
    if age not in AGE_BANDS:
        raise FieldError("Age", f"expected one of the README's codes {list(AGE_BANDS)}, got {age!r}")
    if not occupation.isdecimal() or int(occupation) > 20:
        raise FieldError("Occupation", f"expected a code 0..20, got {occupation!r}")
    return user, AGE_BANDS[age] if by == "age" else GENDERS[gender]
