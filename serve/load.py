"""Load an export folder (written by `python -m train export`), verifying it before anything runs.

    exp = load_export("exports/ml1m_hstu")     # raises ExportLoadError naming the file on any problem

Checks, in order: export.json parses and has this format; every file it lists exists and matches its
sha256 (a tampered, truncated or missing file fails here, by name); the required files are among them;
config.json's model config has known keys; the weights load strictly into the model it describes; the
item index and items.jsonl.gz agree with the config's catalogue size; a model with query tokens has its
query vocabulary (queries.json) and, when it reads query text, the text encoder's record in config.json
(`query_encoder`: folder, sha256, max_length, dim; serve/search.py checks the installed encoder against
it); `num_domains` (the model's per-domain parameter sets: 1, or one per name in `domains`) fits the
weights, and program.pt2 takes `domains` exactly when the model has per-domain parameters. Never imports
train/ or DeepSpeed.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from configs.provenance import file_sha256
from configs.schema import ModelConfig
from model.seqrec import ENCODE_INPUTS, SeqRecModel, model_from_state

FORMAT, FORMAT_VERSION = "unirec-export", 1
REQUIRED = ("model.safetensors", "config.json", "items.jsonl.gz", "item_index.safetensors", "program.pt2",
            "README.md")
CONFIG_KEYS = ("model", "max_len", "num_items", "num_queries", "dim", "has_timestamps", "domains", "program_inputs")


class ExportLoadError(RuntimeError):
    """An export folder that is incomplete, corrupt, tampered with or of another format; names the file."""


@dataclass
class Export:
    """A verified export: everything serving needs, in memory."""

    path: Path
    record: dict  # export.json
    config: dict  # config.json
    model: SeqRecModel  # eager, eval mode (also holds the generative head when there is one)
    table: torch.Tensor  # (I+1, D) unit-norm item vectors, row 0 = padding
    servable: torch.Tensor  # (I+1,) bool: may be returned (row 0 and untrained cold items never are)
    items: list[dict]  # items.jsonl.gz rows; items[i - 1] is dense id i
    index_of: dict[str, int]  # raw item id -> dense id
    popular: np.ndarray  # servable dense ids, most trained-on first (the empty-history fallback)
    bias: torch.Tensor | None = None  # (I+1,) added to every item's score: eval.cold_offset on cold rows
    queries: list[str] = field(default_factory=list)  # queries.json: query id -> string (0 = ""); [] = none
    query_of: dict[str, int] = field(default_factory=dict)  # query string -> query id (ids >= 1)

    @property
    def model_id(self) -> str:
        """Short id of the weights (sha256 of model.safetensors), returned with every answer."""
        return self.record["files"]["model.safetensors"][:12]

    @property
    def max_len(self) -> int:
        return int(self.config["max_len"])

    @property
    def num_items(self) -> int:
        return int(self.config["num_items"])

    @property
    def has_queries(self) -> bool:
        """The model has query tokens (a query vocabulary and a query embedding path): /search can work."""
        return int(self.config["num_queries"]) > 0

    @property
    def query_encoder(self) -> dict | None:
        """config.json's text encoder record when the model reads query text (query_repr text / id+text)."""
        return self.config.get("query_encoder")

    @property
    def domains(self) -> list[str]:
        """Domain names; a request's `domain` is one of them, its id the name's index."""
        return list(self.config["domains"])

    @property
    def num_domains(self) -> int:
        """Per-domain parameter sets of the model (1: one model for every domain, e.g. a merged export)."""
        return int(self.config.get("num_domains", 1))

    @property
    def within_domain(self) -> bool:
        """Serve a domain's request only items of that domain (the run's eval.within_domain)."""
        return bool(self.config.get("within_domain", False))

    @property
    def program_takes_domains(self) -> bool:
        """program.pt2's last input is domains (B,) int64 (a model with per-domain parameters)."""
        return "domains" in self.config["program_inputs"]

    def load_program(self, kind: str = "program"):
        """The compiled encoder: 'program' (torch.export, program.pt2) or 'aoti' (program_aoti.pt2)."""
        if kind == "program":
            return torch.export.load(self.path / "program.pt2").module()
        if kind == "aoti":
            if "program_aoti.pt2" not in self.record["files"]:
                raise ExportLoadError(f"{self.path} has no program_aoti.pt2 (export with --aoti)")
            from torch._inductor import aoti_load_package
            return aoti_load_package(str(self.path / "program_aoti.pt2"))
        raise ValueError(f"encoder program kind must be 'program' or 'aoti', got {kind!r}")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ExportLoadError(f"{path} is missing: not an export folder (python -m train export writes one)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportLoadError(f"{path} is not valid JSON ({e})") from e


def verify_files(path: Path, record: dict) -> None:
    """Every file export.json lists exists with its sha256; every required file is listed."""
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise ExportLoadError(f"{path / 'export.json'}: format {record.get('format')!r} version "
                              f"{record.get('format_version')!r}, this server reads {FORMAT!r} {FORMAT_VERSION}")
    files = record.get("files")
    if not isinstance(files, dict):
        raise ExportLoadError(f"{path / 'export.json'} has no 'files' table of sha256s")
    for name in REQUIRED:
        if name not in files:
            raise ExportLoadError(f"{path / 'export.json'} does not list {name}")
    for name, want in files.items():
        p = path / name
        if not p.is_file():
            raise ExportLoadError(f"{p} is missing (export.json lists it)")
        if file_sha256(p) != want:
            raise ExportLoadError(f"{p} fails its sha256 in export.json (corrupt or modified)")


def _model_config(path: Path, config: dict) -> ModelConfig:
    for key in CONFIG_KEYS:
        if key not in config:
            raise ExportLoadError(f"{path / 'config.json'} has no {key!r}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(config["model"]) - known)
    if unknown:
        raise ExportLoadError(f"{path / 'config.json'}: unknown model keys {unknown} (an export from a newer version?)")
    return ModelConfig(**config["model"])


def _load_items(path: Path, num_items: int) -> list[dict]:
    try:
        with gzip.open(path / "items.jsonl.gz", "rt") as f:
            items = [json.loads(line) for line in f]
    except (OSError, json.JSONDecodeError, EOFError) as e:
        raise ExportLoadError(f"{path / 'items.jsonl.gz'} does not read ({e})") from e
    if len(items) != num_items or any(r.get("id") != i + 1 for i, r in enumerate(items)):
        raise ExportLoadError(f"{path / 'items.jsonl.gz'} must hold dense ids 1..{num_items} in order")
    return items


QUERY_ENCODER_KEYS = (("encoder", str), ("encoder_sha256", str), ("max_length", int), ("dim", int), ("bf16", bool))


def _load_queries(path: Path, record: dict, config: dict, model: SeqRecModel) -> list[str]:
    """queries.json (checked against config.json) and config.json's query facts; [] without query tokens."""
    num = int(config["num_queries"])
    if num == 0:
        return []
    if "queries.json" not in record["files"]:
        raise ExportLoadError(f"{path / 'export.json'} does not list queries.json (the model has {num} queries)")
    strings = _read_json(path / "queries.json")
    if (not isinstance(strings, list) or len(strings) != num + 1 or strings[0] != ""
            or not all(isinstance(q, str) and q for q in strings[1:])):
        raise ExportLoadError(f"{path / 'queries.json'} must be a list of {num + 1} strings, '' first "
                              "(config.json's num_queries + 1)")
    if config.get("query_repr") != config["model"].get("query_repr"):
        raise ExportLoadError(f"{path / 'config.json'}: query_repr {config.get('query_repr')!r} is not the model's "
                              f"{config['model'].get('query_repr')!r}")
    text = getattr(model.embed, "query_text", None)
    if text is not None:
        enc = config.get("query_encoder")
        bad = [k for k, t in QUERY_ENCODER_KEYS if not isinstance(enc, dict) or not isinstance(enc.get(k), t)]
        if bad or enc["dim"] != text.shape[1]:
            raise ExportLoadError(f"{path / 'config.json'}: query_encoder must record the text encoder "
                                  f"({', '.join(k for k, _ in QUERY_ENCODER_KEYS)}; dim {text.shape[1]}), "
                                  f"got {enc!r}")
    return strings


def _num_domains(path: Path, config: dict) -> int:
    """config.json's num_domains (1 when absent: an export from before per-domain models), checked."""
    names, num = config["domains"], config.get("num_domains", 1)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ExportLoadError(f"{path / 'config.json'}: domains must be a non-empty list of names, got {names!r}")
    if not isinstance(num, int) or num not in (1, len(names)):
        raise ExportLoadError(f"{path / 'config.json'}: num_domains must be 1 or len(domains) = {len(names)}, "
                              f"got {num!r}")
    return num


def _check_program_inputs(path: Path, config: dict, model: SeqRecModel) -> None:
    """program.pt2 takes domains exactly when the model has per-domain parameters."""
    want = list(ENCODE_INPUTS) + (["domains"] if model.per_domain else [])
    if config["program_inputs"] != want:
        raise ExportLoadError(f"{path / 'config.json'}: program_inputs {config['program_inputs']} for a model "
                              f"{'with' if model.per_domain else 'without'} per-domain parameters; expected {want}")


def load_export(path: str | Path) -> Export:
    """Verify and load an export folder (see the module docstring)."""
    path = Path(path)
    record = _read_json(path / "export.json")
    verify_files(path, record)
    config = _read_json(path / "config.json")
    cfg = _model_config(path, config)
    facts = {**config, "num_domains": _num_domains(path, config)}
    try:
        state = load_file(path / "model.safetensors")
        model = model_from_state(cfg, facts, state)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportLoadError(f"{path / 'model.safetensors'} does not fit config.json's model: {e}") from e
    _check_program_inputs(path, config, model)
    index = load_file(path / "item_index.safetensors")
    table, servable = index.get("items"), index.get("servable")
    I, D = int(config["num_items"]), int(config["dim"])
    bias = index.get("bias", torch.zeros(I + 1))  # exports before eval.cold_offset have none: 0
    if table is None or servable is None or table.shape != (I + 1, D) or servable.shape != (I + 1,) \
            or bias.shape != (I + 1,):
        raise ExportLoadError(f"{path / 'item_index.safetensors'} must hold items ({I + 1}, {D}), servable "
                              f"({I + 1},) and, when present, bias ({I + 1},) for config.json's catalogue")
    items = _load_items(path, I)
    index_of = {r["item_id"]: r["id"] for r in items}
    counts = np.array([0] + [r.get("train_count", 0) for r in items], dtype=np.int64)
    ids = np.nonzero(servable.numpy())[0]
    popular = ids[np.lexsort((ids, -counts[ids]))]  # most trained-on first, ties by id
    queries = _load_queries(path, record, config, model)
    return Export(path, record, config, model, table.float(), servable.bool(), items, index_of, popular,
                  bias.float(), queries, {q: i for i, q in enumerate(queries) if i > 0})
