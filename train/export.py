"""Export: a run directory -> one self-describing folder that serving loads, needing nothing else.

    python -m train export --run runs/ml1m_hstu --tag best --out exports/ml1m_hstu [--dtype bf16] [--aoti]

run (config.json, metrics.json, ckpt/<tag> at any ZeRO stage) + its shard folder (manifest, catalog,
semantic IDs, training counts) -> OUT/
    model.safetensors       weights (fp32, or bf16 with --dtype bf16; buffers such as codes stay exact)
    config.json             model config + the data facts the model needs (max_len, vocab, time settings)
    items.jsonl.gz          dense id -> raw id, domain, title, cold, servable, train_count (0 = padding left out)
    item_index.safetensors  "items" (I+1, D): the unit-norm table the retrieval head scores; "servable" (I+1,)
    semantic_ids/           codes + codebook, when the shards have them (the trie is built from the codes)
    queries.json            with query tokens: the query vocabulary, index = query id (0 = ""), for /search
    program.pt2             torch.export of the encoder (padded histories [+ domains (B,)] -> last state), dynamic B, N
    program_aoti.pt2        with --aoti: the same program compiled by AOTInductor
    README.md               model card
    export.json             provenance + sha256 of every other file (serve.load_export verifies them all)

A model with per-domain parameters (MLoRA adapters, a domain embedding) exports them all: program.pt2 then
takes each sequence's domain id, config.json names the domains (`domains`, `num_domains`). With
--merge-domain NAME the export is that one domain's model instead: its adapters folded into W (no adapter
cost at serving), its domain embedding row alone (train/export_merge.py).

The folder is written as OUT.partial and swapped into place only when complete and verified.
"""
from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from configs.load import load_config
from configs.provenance import file_sha256, git_sha
from configs.schema import LoaderConfig, PretrainConfig
from data_pipeline.atomic_dir import swap_into_place
from data_pipeline.collate import jagged_from_padded
from data_pipeline.read_shards import cold_items, load_manifest, other_shards
from model.seqrec import ENCODE_INPUTS, SeqRecModel, model_from_state, serving_state
from train.baselines import item_counts
from train.engine import consolidated_state_dict

FORMAT, FORMAT_VERSION = "unirec-export", 1
PROGRAM_INPUTS = ENCODE_INPUTS  # a model without per-domain parameters; program_inputs(model) in general
TOLERANCE = 1e-5  # max |program - eager| on unit-norm states, checked at export time


class ExportError(RuntimeError):
    """The run cannot be exported as asked (missing checkpoint, program differs from eager, ...)."""


def program_inputs(model: SeqRecModel) -> tuple[str, ...]:
    """program.pt2's inputs, in order: ENCODE_INPUTS, + domains (B,) for a model with per-domain parameters."""
    return ENCODE_INPUTS + ("domains",) if model.per_domain else ENCODE_INPUTS


class Encoder(torch.nn.Module):
    """What program.pt2 holds: right-padded histories (B, N) int64 + lengths (B,) [+ domains (B,) int64,
    for a model with per-domain parameters] -> last states (B, D)."""

    def __init__(self, model: SeqRecModel):
        super().__init__()
        self.model = model

    def forward(self, item_ids, actions, timestamps, next_timestamps, lengths, domains=None):
        return self.model.encode_padded(item_ids, actions, timestamps, next_timestamps, lengths, domains)


def random_histories(num_items: int, max_len: int, lengths: list[int], gen: torch.Generator,
                     num_domains: int = 0) -> dict:
    """Right-padded random histories with the given lengths: the padded tensors and the jagged batch.
    num_domains > 0: also random domain ids (B,) `domains`, mixed (min(B, num_domains) distinct ones),
    set as the batch's `domain`; drawn last, so the histories are those of num_domains = 0."""
    B, N = len(lengths), max(lengths)
    lens = torch.tensor(lengths)
    valid = torch.arange(N)[None, :] < lens[:, None]  # (B, N)
    ids = torch.randint(1, num_items + 1, (B, N), generator=gen) * valid
    acts = torch.randint(0, 9, (B, N), generator=gen) * valid
    ts = torch.sort(torch.randint(1_000_000_000, 1_700_000_000, (B, N), generator=gen), 1).values * valid
    nts = torch.cat([ts[:, 1:], ts[:, -1:]], 1)
    nts[torch.arange(B), lens - 1] = ts[torch.arange(B), lens - 1] + torch.randint(0, 10**6, (B,), generator=gen)
    nts = nts * valid
    padded = dict(item_ids=ids, actions=acts, timestamps=ts, next_timestamps=nts, lengths=lens)
    batch = jagged_from_padded(ids, acts, ts, nts, lens)
    if num_domains > 0:
        shift = torch.randint(0, num_domains, (1,), generator=gen)
        padded["domains"] = (torch.randperm(B, generator=gen) + shift) % num_domains  # (B,)
        batch = replace(batch, domain=padded["domains"])
    return dict(padded=padded, batch=batch)


def check_lengths(max_len: int, gen: torch.Generator) -> list[list[int]]:
    """Length sets for the export-time check: 1 and max_len always, random ones in between."""
    rnd = torch.randint(1, max_len + 1, (6,), generator=gen).tolist()
    return [[1, max_len] + rnd[:3], [max_len, 2] + rnd[3:], [1]]


@torch.no_grad()
def verify_program(program, model: SeqRecModel, num_items: int, max_len: int, seed: int = 0) -> float:
    """Max |program(padded) - model(jagged, last_only)| over random histories of lengths 1..max_len (and,
    for a model with per-domain parameters, random mixed domains); raises ExportError above TOLERANCE."""
    gen, worst = torch.Generator().manual_seed(seed), 0.0
    inputs, num_domains = program_inputs(model), model.num_domains if model.per_domain else 0
    for lengths in check_lengths(max_len, gen):
        h = random_histories(num_items, max_len, lengths, gen, num_domains)
        want = model(h["batch"], last_only=True)
        got = program(*(h["padded"][k] for k in inputs))
        worst = max(worst, float((got - want).abs().max()))
        if not worst <= TOLERANCE:  # NaN fails too
            raise ExportError(f"the exported program differs from the eager model by {worst:.3g} (> {TOLERANCE}) "
                              f"on histories of lengths {lengths}")
    return worst


def export_program(model: SeqRecModel, max_len: int):
    """torch.export of Encoder(model), dynamic in batch size (1..4096) and history length (1..max_len);
    a model with per-domain parameters takes domains (B,) as the last input."""
    from torch.export import Dim
    inputs = program_inputs(model)
    h = random_histories(model.embed.item.num_items, max_len, [min(3, max_len), min(5, max_len), 2],
                         torch.Generator().manual_seed(1), model.num_domains if model.per_domain else 0)
    B, N = Dim("batch", min=1, max=4096), Dim("history", min=1, max=max_len)
    dyn = {k: {0: B, 1: N} for k in ENCODE_INPUTS[:-1]} | {k: {0: B} for k in inputs[len(ENCODE_INPUTS) - 1:]}
    with torch.no_grad():
        return torch.export.export(Encoder(model), tuple(h["padded"][k] for k in inputs), dynamic_shapes=dyn)


def cold_offset(cfg, metrics: dict) -> float:
    """The score offset of cold items the run was tested with: metrics.json's (eval.calibrate_cold, or any
    run since it was recorded), else the config's eval.cold_offset."""
    got = metrics.get("cold_offset")
    return float(cfg.eval.cold_offset if got is None else got)


@torch.no_grad()
def item_table(model: SeqRecModel, chunk: int = 65536) -> torch.Tensor:
    """(I+1, D) unit-norm item vectors (row 0 = padding, zero), exactly as the evaluator scores them."""
    n = model.embed.item.num_items + 1
    rows = [F.normalize(model.embed.item(torch.arange(lo, min(lo + chunk, n))).float(), dim=-1, eps=1e-6)
            for lo in range(0, n, chunk)]
    return torch.cat(rows)


def item_rows(shards: Path, manifest: dict, servable: np.ndarray, counts: np.ndarray) -> list[dict]:
    """items.jsonl.gz rows from the shard catalog (every dense id 1..I, cold items included)."""
    maps, cold = manifest["id_maps"], set(cold_items(manifest).tolist())
    item_domain = manifest.get("item_domain")  # (I+1,) top-level, -1 = an item of several domains
    catalog = {}
    path = shards / manifest.get("catalog", "catalog.jsonl.gz")
    if path.exists():
        with gzip.open(path, "rt") as f:
            catalog = {r["id"]: r for r in map(json.loads, f)}
    domains = maps["domains"]
    out = []
    for i in range(1, manifest["vocab"]["num_items"] + 1):
        row = catalog.get(i, {})
        dom = item_domain[i] if item_domain is not None else -1
        out.append(dict(id=i, item_id=maps["items"][i], domain=row.get("domain", domains[dom] if dom >= 0 else None),
                        title=row.get("title") or None, cold=i in cold, servable=bool(servable[i]),
                        train_count=int(counts[i])))
    return out


def data_facts(cfg: PretrainConfig, manifest: dict, model: SeqRecModel, query_encoder: dict | None = None,
               domains: list[str] | None = None) -> dict:
    """config.json. The model config is the exported model's (a merged one has adapters 'none'); `domains`:
    the names its domain ids index (default: the shard set's); num_domains: how many per-domain parameter
    sets the model has (1 for a model without any: one model serves every domain)."""
    v, m = manifest["vocab"], model.cfg
    return dict(format=FORMAT, format_version=FORMAT_VERSION, model=asdict(m), max_len=cfg.data.max_len,
                num_items=v["num_items"], num_queries=v["num_queries"], dim=m.dim,
                level_sizes=model.embed.item.level_sizes, has_timestamps=manifest.get("has_timestamps", True),
                dataset=manifest["dataset"], domains=domains or manifest["id_maps"]["domains"],
                num_domains=model.num_domains if model.per_domain else 1, within_domain=cfg.eval.within_domain,
                exclude_history=cfg.eval.exclude_history, program_inputs=list(program_inputs(model)),
                timestamps=("unix seconds" if manifest.get("has_timestamps", True) else
                            "per-user chronological ranks 0, 1, 2, ... (the source has no times)"),
                query_repr=m.query_repr if v["num_queries"] else None, query_encoder=query_encoder)


QUERY_ENCODER_KEYS = ("encoder", "encoder_sha256", "max_length", "dim", "bf16")  # from content/queries.json


def write_queries(shards: Path, manifest: dict, model: SeqRecModel, out: Path) -> dict | None:
    """With query tokens: out/queries.json (the vocabulary, index = query id, 0 = "") and, for a model that
    reads query text, the text encoder's record from the shards' content/queries.json (config.json's
    `query_encoder`: the server encodes unseen query strings with it and refuses another encoder).
    Raises ExportError when the shards' query vectors are not the ones inside the model."""
    strings, num = manifest["id_maps"].get("queries", [""]), manifest["vocab"]["num_queries"]
    if not num:
        return None
    if len(strings) != num + 1 or strings[0] != "":
        raise ExportError(f"{shards / 'manifest.json'}: id_maps.queries has {len(strings)} strings, "
                          f"vocab.num_queries + 1 = {num + 1} expected (row 0 = '')")
    write_json(out / "queries.json", strings)
    text = getattr(model.embed, "query_text", None)  # (Q+1, H) buffer: only query_repr text / id+text
    if text is None:
        return None  # an id-only query model reads no text: no encoder to pin
    from data_pipeline.content import ContentError
    from data_pipeline.queries import load_query_vectors
    try:
        vectors, meta = load_query_vectors(shards)
    except ContentError as e:
        raise ExportError(str(e)) from e
    if not torch.equal(torch.from_numpy(vectors), text.float()):
        raise ExportError(f"{shards / 'content' / 'queries.npy'} differs from the query vectors the model trained "
                          "with (content re-run with another encoder or settings?): the server could not encode "
                          "new queries like the trained ones")
    return {k: meta.get(k, False if k == "bf16" else None) for k in QUERY_ENCODER_KEYS}


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def main(run: str | Path, out: str | Path, tag: str = "best", dtype: str = "fp32", aoti: bool = False,
         overwrite: bool = False, command: str | None = None, merge_domain_name: str | None = None) -> dict:
    """Export run/ckpt/<tag> to `out`; returns export.json's content. merge_domain_name: export that
    domain's single-domain model (--merge-domain)."""
    run, out = Path(run), Path(out)
    # ---- the run: config, metrics, weights of any ZeRO stage ------------------------------------------
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (--overwrite replaces it)")
    for name in ("config.json", "metrics.json"):
        if not (run / name).exists():
            raise ExportError(f"{run / name} not found: export needs a finished run (config.json, metrics.json, ckpt/)")
    cfg = load_config(PretrainConfig, run / "config.json")
    metrics = json.loads((run / "metrics.json").read_text())
    if not (run / "ckpt" / tag).is_dir():
        raise ExportError(f"no checkpoint {run / 'ckpt' / tag} (tags: best = the tested weights, last)")
    state = serving_state(consolidated_state_dict(run / "ckpt", tag))  # a distilled run's align layer stays behind
    shards = Path(cfg.shards)
    manifest = load_manifest(shards)
    if why := other_shards(manifest, metrics, run):
        raise ExportError(f"{shards} is not the shard set the run trained on: {why}")
    facts = dict(num_items=manifest["vocab"]["num_items"], num_queries=manifest["vocab"]["num_queries"],
                 max_len=cfg.data.max_len, level_sizes=(manifest.get("semantic_ids") or {}).get("level_sizes"),
                 num_domains=manifest["vocab"].get("num_domains", 1))  # as build_model built it for training
    model = model_from_state(cfg.model, facts, state)
    domains, merge_diff = manifest["id_maps"]["domains"], None
    if merge_domain_name is not None:
        from train.export_merge import merge_domain
        model, merge_diff = merge_domain(model, facts, domains, merge_domain_name)
        domains = [merge_domain_name]

    # ---- the program, checked against the eager model -------------------------------------------------
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    program = export_program(model, cfg.data.max_len)
    torch.export.save(program, tmp / "program.pt2")
    program_diff = verify_program(torch.export.load(tmp / "program.pt2").module(), model, facts["num_items"],
                                  cfg.data.max_len)
    export_s = time.perf_counter() - t0
    aoti_diff = None
    if aoti:
        from torch._inductor import aoti_compile_and_package, aoti_load_package
        aoti_compile_and_package(program, package_path=str(tmp / "program_aoti.pt2"))
        aoti_diff = verify_program(aoti_load_package(str(tmp / "program_aoti.pt2")), model, facts["num_items"],
                                   cfg.data.max_len)

    # ---- weights, item index, items, codes -------------------------------------------------------------
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    exact = {"embed.item.content", "embed.query_text"}  # encoder outputs: kept as computed
    save_file({k: (v.to(cast) if v.is_floating_point() and k not in exact else v).contiguous()
               for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    cold = cold_items(manifest)
    servable = np.ones(facts["num_items"] + 1, dtype=bool)
    servable[0] = False
    if cfg.model.item_repr == "id" and len(cold):  # no trained vector: offline evaluation does not rank them
        servable[cold] = False
    # eval.cold_offset (metrics.json's when eval.calibrate_cold chose it) on the cold rows, so serving ranks as
    # the evaluation did; 0 elsewhere
    bias = torch.zeros(facts["num_items"] + 1)
    bias[torch.from_numpy(cold[servable[cold]])] = cold_offset(cfg, metrics)
    save_file({"items": item_table(model), "servable": torch.from_numpy(servable), "bias": bias},
              tmp / "item_index.safetensors")
    counts = item_counts(shards, facts["num_items"], loader=LoaderConfig(skip_bad_shards=cfg.data.skip_bad_shards))
    with gzip.open(tmp / "items.jsonl.gz", "wt") as f:
        for row in item_rows(shards, manifest, servable, counts):
            f.write(json.dumps(row) + "\n")
    if manifest.get("semantic_ids"):
        shutil.copytree(shards / manifest["semantic_ids"]["path"], tmp / "semantic_ids")
    query_encoder = write_queries(shards, manifest, model, tmp)
    facts = data_facts(cfg, manifest, model, query_encoder, domains)
    write_json(tmp / "config.json", facts)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = dict(format=FORMAT, format_version=FORMAT_VERSION, created=created,
                  git_sha=git_sha(), run=str(run), tag=tag, best_epoch=metrics.get("best_epoch"),
                  run_config_sha256=file_sha256(run / "config.json"), manifest_hash=manifest["content_hash"],
                  dataset=manifest["dataset"], test=metrics.get("test"), test_generative=metrics.get("test_generative"),
                  command=command or " ".join(["python -m train export"] + sys.argv[2:]), dtype=dtype,
                  cold_offset=cold_offset(cfg, metrics),
                  program_max_abs_diff=program_diff, aoti_max_abs_diff=aoti_diff,
                  merged_domain=merge_domain_name, merge_max_abs_diff=merge_diff,
                  export_seconds=round(export_s, 1))
    (tmp / "README.md").write_text(model_card(record, facts, servable))
    record["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / "export.json", record)
    swap_into_place(tmp, out)
    return record


def model_card(rec: dict, facts: dict, servable: np.ndarray) -> str:
    m, test = facts["model"], rec.get("test") or {}
    metric = lambda k: f"{test[k]:.4f}" if isinstance(test.get(k), float) else "n/a"  # noqa: E731
    gen = "yes (semantic-ID beam search over the codes in model.safetensors)" if m["generative_head"] else "no"
    layers = f"{m['num_layers']} x {m['arch'].upper()} ({m['layer_variant']}), D {m['dim']}, {m['num_heads']} head(s)"
    return f"""# {rec['dataset']} sequential recommender ({m['arch']})

Exported {rec['created']} from `{rec['run']}` (checkpoint `{rec['tag']}`, epoch {rec['best_epoch']}) at git
{rec['git_sha'][:12]} by `{rec['command']}`.

## What it is
An encoder of a user's item history: {layers}, item representation `{m['item_repr']}`,
relative position bias {m['pos_bias']}, relative time bias {m['time_bias']}, max history {facts['max_len']} events.
It maps the history to one unit vector; items are ranked by its dot product with `item_index.safetensors`
(`items`, {facts['num_items']:,} items + padding row 0; {int(servable.sum()):,} servable).
Generative head: {gen}.

## Data and metrics
Trained on `{rec['dataset']}` (shard manifest {rec['manifest_hash'][:12]}); timestamps are {facts['timestamps']}.
Test split (leave-one-out, full ranking, history exclusion `{facts['exclude_history']}`):
HR@10 {metric('hr@10')}, NDCG@10 {metric('ndcg@10')}, MRR {metric('mrr')} over {test.get('count', 'n/a')} users.

## Load it
```python
import serve
exp = serve.load_export("path/to/this/folder")   # verifies every file's sha256 (export.json)
```
or serve it: `python -m serve --export DIR --port 8000`.

## Request format
`POST /recommend {{"history": ["<raw item id>", ...], "timestamps": [<unix s>, ...], "k": 10}}`
-> `{{"items": [{{"id": ..., "score": ..., "title": ...}}], "model": ..., "took_ms": ..., "warnings": [...]}}`.
{domain_card(rec, facts)}{search_card(facts)}`program.pt2` inputs (torch.export, dynamic batch and history length):
{', '.join(facts['program_inputs'])}: right-padded (B, N) int64 histories and lengths (B,){domain_inputs(facts)}
-> (B, {m['dim']}) unit-norm item-only states.
"""


def domain_inputs(facts: dict) -> str:
    if "domains" not in facts["program_inputs"]:
        return ""
    return " and domain ids (B,) int64, indices into config.json `domains`"


def domain_card(rec: dict, facts: dict) -> str:
    """The model card's paragraph on the request's `domain` field (empty when a model serves one domain)."""
    names, m = facts["domains"], facts["model"]
    only = (" Answers hold only items of the request's domain (within_domain: another domain's items are "
            "excluded).") if facts.get("within_domain") else ""
    if facts.get("num_domains", 1) > 1:
        what = [f"{m['adapters']} adapters"] * (m["adapters"] != "none")
        what += ["a domain embedding"] * bool(m["domain_embedding"])
        return (f"Every request needs `\"domain\"`: one of {names} (the model has per-domain parameters: "
                f"{' and '.join(what)}; a missing or unknown domain is a 422). One micro-batch may mix "
                f"domains.{only}\n")
    if rec.get("merged_domain"):
        return (f"This is domain `{rec['merged_domain']}`'s model (its adapters merged into the weights): "
                f"`\"domain\"` may be omitted, or must be `{rec['merged_domain']}`.{only}\n")
    if only and len(names) > 1:
        return f"Every request needs `\"domain\"`: one of {names}.{only}\n"
    return ""


def search_card(facts: dict) -> str:
    """The model card's /search paragraph (empty for a model without query tokens)."""
    if not facts["num_queries"]:
        return ""
    enc = facts.get("query_encoder")
    how = (f"unseen query strings are encoded on the fly by the text encoder `{enc['encoder']}` (sha256 "
           f"{enc['encoder_sha256'][:12]}, max_length {enc['max_length']}); the server refuses another one"
           if enc else "a query string outside `queries.json` has no representation (id-only queries): 422")
    return (f"`POST /search {{\"query\": \"...\", \"history\": [...], \"k\": 10}}`: the history + one query token "
            f"(query_repr `{facts['query_repr']}`, {facts['num_queries']:,} known queries in `queries.json`); {how}. "
            "Search runs the eager model (program.pt2 encodes item-only histories).\n")
