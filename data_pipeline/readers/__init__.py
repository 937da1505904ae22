"""Raw dataset folders -> `schema.Dataset`. One reader function per source format; `read_dataset`
picks it by dataset name."""
from __future__ import annotations

from pathlib import Path

from data_pipeline.readers.amazon import read_amazon
from data_pipeline.readers.movielens import read_ml1m, read_ml100k, read_ml_latest_small
from data_pipeline.schema import Dataset

VALID_NAMES = ("ml-1m", "ml-100k", "ml-latest-small", "amazon-<category> (e.g. amazon-beauty, amazon-sports)")

__all__ = ["VALID_NAMES", "read_amazon", "read_dataset", "read_ml1m", "read_ml100k", "read_ml_latest_small"]


def read_dataset(name: str, raw: str | Path, skip_bad_rows: bool = False) -> Dataset:
    """Read the raw folder of dataset `name`. Bad rows raise DataError(file:line, field), or with
    skip_bad_rows are skipped and counted in Dataset.skipped_rows."""
    if name == "ml-1m":
        return read_ml1m(raw, skip_bad_rows)
    elif name == "ml-100k":
        return read_ml100k(raw, skip_bad_rows)
    elif name == "ml-latest-small":
        return read_ml_latest_small(raw, skip_bad_rows)
    elif name.startswith("amazon-") and len(name) > len("amazon-"):
        return read_amazon(raw, name[len("amazon-"):], skip_bad_rows)
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(VALID_NAMES)}")
