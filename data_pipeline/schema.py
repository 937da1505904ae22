"""The canonical data contract: events, item catalog, action codes, and the shard sample layout.

Every reader returns a `Dataset` (events + catalog); everything downstream (shards, loader, model) reads
only these types, so a new source format is one new reader and nothing else.

Events are columnar numpy arrays, not a list of row objects: ML-1M has 1,000,209 events and a row object
per event costs ~10x the memory and time of five arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ---- action codes (small ints; 0 is padding so an embedding table can use padding_idx=0) -------------
ACTION_PAD = 0
ACTION_QUERY = 1  # the action of a query token (a search request, before any item is clicked)
ACTION_INTERACT = 2  # an implicit interaction with no rating: a view, a review, a purchase
ACTION_SEARCH_CLICK = 3  # the item a user clicked after typing the event's query
ACTION_RATING_BASE = 3  # rating r in 1..5 -> ACTION_RATING_BASE + r (4..8); half stars round up
NUM_ACTIONS = 9
MIN_EVENTS_FOR_EVAL = 3  # a user needs >= 1 training event, a validation and a test target


def rating_action(rating: float) -> int:
    """Rating (0.5..5, half stars allowed) -> action code 4..8. Half stars round up: 3.5 -> 4 stars."""
    stars = int(np.ceil(rating))
    if not 1 <= stars <= 5:
        raise ValueError(f"rating {rating!r} outside 0.5..5")
    return ACTION_RATING_BASE + stars


# ---- token types in a batch ---------------------------------------------------------------------------
TOKEN_ITEM = 0  # an item the user interacted with
TOKEN_QUERY = 1  # a search query; the item clicked for it follows as an item token
NUM_TOKEN_TYPES = 2

# ---- shard sample layout ------------------------------------------------------------------------------
# One sample per user, ONE tar member: key "u<dense user index, 9 digits>", `seq.i64` = raw little-endian
# int64 bytes of a C-order (SEQ_ROWS, n) array in chronological order (n = bytes / 8 / SEQ_ROWS; the raw
# user id is in the manifest's id_maps). Measured on ML-1M (6,040 users): Python's tarfile costs ~50 us
# per member and np.load's header parser (ast.literal_eval) ~90 us per array, so one raw member per user
# reads an epoch ~3x faster than .npy + .json members.
SEQ_ROWS = ("item", "timestamp", "action", "domain", "query")
ROW_ITEM, ROW_TS, ROW_ACTION, ROW_DOMAIN, ROW_QUERY = range(len(SEQ_ROWS))


class DataError(ValueError):
    """A malformed input row: names the file, the 1-based line number and the field."""

    def __init__(self, path: str, line: int, field_name: str, message: str):
        self.path, self.line, self.field_name = str(path), line, field_name
        super().__init__(f"{path}:{line}: field '{field_name}': {message}")


@dataclass
class Events:
    """Canonical interaction events, one entry per event, all arrays of equal length E.

    `timestamp` is int seconds; when the source has no timestamps (`has_timestamps=False`) it is the
    event's 0-based chronological rank within its user, so sorting still gives the true order but time
    differences carry no meaning (the model's time bias is then inert).
    """

    user_id: np.ndarray  # (E,) object: raw user ids as str
    item_id: np.ndarray  # (E,) object: raw item ids as str, unique within the dataset across domains
    timestamp: np.ndarray  # (E,) int64
    action: np.ndarray  # (E,) int64, one of the ACTION_* codes
    domain: np.ndarray  # (E,) object: domain name per event, e.g. "movies", "beauty"
    query: np.ndarray  # (E,) object: query text, "" unless the event is a search
    has_timestamps: bool = True

    def __post_init__(self):
        n = len(self.user_id)
        for name in ("item_id", "timestamp", "action", "domain", "query"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Events.{name} has {len(getattr(self, name))} entries, user_id has {n}")

    def __len__(self) -> int:
        return len(self.user_id)

    @staticmethod
    def from_columns(user_id, item_id, timestamp, action, domain, query=None, has_timestamps=True):
        """Build from Python lists (or arrays); `domain` may be a single str for all events."""
        n = len(user_id)
        obj = lambda xs: np.asarray(xs, dtype=object)  # noqa: E731
        dom = obj([domain] * n) if isinstance(domain, str) else obj(domain)
        qry = obj([""] * n) if query is None else obj(query)
        return Events(obj(user_id), obj(item_id), np.asarray(timestamp, dtype=np.int64),
                      np.asarray(action, dtype=np.int64), dom, qry, has_timestamps)


@dataclass
class Item:
    """One catalog entry. Text fields feed the content encoder; `features` holds per-modality vectors."""

    item_id: str
    domain: str
    title: str = ""
    categories: list[str] = field(default_factory=list)
    brand: str = ""
    description: str = ""
    attributes: dict = field(default_factory=dict)  # anything else worth keeping: genres, price, year
    features: dict = field(default_factory=dict)  # modality name -> np.ndarray, e.g. {"image": (512,)}


@dataclass
class Dataset:
    """What a reader returns: events, the item catalog, and how many bad rows were skipped."""

    name: str
    events: Events
    catalog: dict[str, Item]  # raw item id -> Item; may hold items no event touches (ML-1M: 3,883 vs 3,706)
    skipped_rows: int = 0  # rows dropped because the user asked for --skip-bad-rows
    notes: list[str] = field(default_factory=list)  # human-readable facts for the summary / manifest
    search_info: dict = field(default_factory=dict)  # how search events were made (data_pipeline.search_data)
