"""Teacher labels computed once: `python -m train teacher-labels --teacher runs/x --out labels/x`.

A teacher too large to run every step runs once over the train split (the pattern of Meta's ExFM), on
any number of ranks (the same launchers as pretraining); each rank writes the examples it reads:

    labels/x/part-RRRRR-of-WWWWW/   users.npy (U,) int64      counts.npy (U,) positions per user
                                    targets.npy (P,) int64    the target at each position (the alignment check)
                                    topk_ids.npy (P, K) int32 topk_logits.npy (P, K) float32 (best first)
                                    states.npy (P, Dt) float32 the teacher's unit-norm states
    labels/x/table.npy               (I+1, Dt) float32 the teacher's unit-norm item table
    labels/x/labels.json             written last (its presence = complete): format, teacher + fingerprint,
                                     example identity (manifest hash + the loader settings that decide the
                                     training tokens) and its sha256, K, the teacher's temperature, parts

A position is a token with a target (batch.targets > 0, query tokens included), in token order per user.
`distill.labels=labels/x` reads it back memory-mapped (TeacherLabels): refused when the manifest hash or
the example identity differs from the run's, and per batch when a user's positions or targets differ.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.load import ConfigError
from configs.provenance import git_sha
from configs.schema import DistillConfig, LoaderConfig
from data_pipeline.collate import make_loader
from data_pipeline.read_shards import load_manifest
from model.embeddings import jagged_positions
from train import engine as E
from train.losses import TeacherTargets
from train.pretrain import train_candidates
from train.teacher import (
    OnlineTeacher,
    allowed_items,
    check_teacher_data,
    fingerprint,
    load_teacher,
    param_counts,
    teacher_run,
)

FORMAT, FORMAT_VERSION = "unirec-teacher-labels", 1
FIELDS = ("targets", "topk_ids", "topk_logits", "states")  # per position; users and counts per user


class LabelError(ConfigError):
    """Label files that are missing, incomplete, or not those of this run's shards and training examples."""


def example_identity(manifest: dict, data: LoaderConfig) -> dict:
    """What decides the training tokens at each position: the shard set and the loader's token settings."""
    if data.random_window > 0:
        raise ConfigError(f"data.random_window={data.random_window}: training histories then change every epoch, "
                          "so no label file can match them; precomputed teacher labels need data.random_window=0")
    return dict(manifest_hash=manifest["content_hash"], split="train", max_len=data.max_len,
                query_tokens=data.query_tokens, train_through_valid=data.train_through_valid,
                domains=sorted(data.domains))


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _user_counts(batch) -> torch.Tensor:
    """(B,) target positions per sequence."""
    seq, _ = jagged_positions(batch.offsets, batch.item_ids.numel())  # (L,) each token's sequence
    return torch.bincount(seq[batch.targets > 0], minlength=batch.num_sequences)


def _collect(teacher: OnlineTeacher, batches, dev, rank: int) -> dict[str, np.ndarray]:
    """The teacher's targets for every example this rank reads, in reading order."""
    out = {k: [] for k in ("users", "counts", *FIELDS)}
    for batch in tqdm(batches, desc="teacher labels", unit="batch", disable=rank != 0, leave=False):
        batch = batch.to(dev)
        t = teacher(batch)
        out["users"].append(batch.user.cpu().numpy())
        out["counts"].append(_user_counts(batch).cpu().numpy())
        out["targets"].append(batch.targets[batch.targets > 0].cpu().numpy())
        out["topk_ids"].append(t.topk_ids.to(torch.int32).cpu().numpy())
        out["topk_logits"].append(t.topk_logits.float().cpu().numpy())
        out["states"].append(t.states.float().cpu().numpy())
    K, D = teacher.k, teacher.table.shape[1]
    empty = dict(users=(0,), counts=(0,), targets=(0,), topk_ids=(0, K), topk_logits=(0, K), states=(0, D))
    dtypes = dict(users=np.int64, counts=np.int64, targets=np.int64, topk_ids=np.int32, topk_logits=np.float32,
                  states=np.float32)
    return {k: np.concatenate(v) if v else np.zeros(empty[k], dtype=dtypes[k]) for k, v in out.items()}


def main(cfg: DistillConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Write the teacher's labels for cfg's train split (cfg.shards, cfg.data, distill.top_k) to `out`."""
    out, teacher_dir = Path(out), Path(cfg.distill.teacher)
    rank, world = E.setup_distributed()
    dev = E.device()
    manifest = load_manifest(cfg.shards)
    tcfg, tmetrics = teacher_run(teacher_dir)
    check_teacher_data(teacher_dir, tcfg, tmetrics, manifest, cfg.data)
    identity = example_identity(manifest, cfg.data)
    if rank == 0:
        if (out / "labels.json").exists() and not overwrite:
            raise LabelError(f"{out} holds teacher labels already (--overwrite replaces them)")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    E.barrier()
    model = load_teacher(teacher_dir, dev)
    allowed = allowed_items(manifest["vocab"]["num_items"], train_candidates(manifest, dev), dev)
    teacher = OnlineTeacher(model, cfg.distill.top_k, tcfg.loss.temperature, allowed)
    arrays = _collect(teacher, make_loader(cfg.shards, "train", cfg.data, shuffle=False), dev, rank)
    part = out / f"part-{rank:05d}-of-{world:05d}"
    part.mkdir()
    for k, v in arrays.items():
        np.save(part / f"{k}.npy", v)
    users, positions = (int(x) for x in E.all_reduce_sum(
        torch.tensor([len(arrays["users"]), len(arrays["targets"])], dtype=torch.float64)).tolist())
    record = dict(format=FORMAT, format_version=FORMAT_VERSION, teacher=str(teacher_dir),
                  teacher_fingerprint=fingerprint(teacher_dir), teacher_temperature=tcfg.loss.temperature,
                  teacher_dim=tcfg.model.dim, teacher_params=param_counts(model), teacher_test=tmetrics.get("test"),
                  identity=identity, identity_hash=identity_hash(identity), top_k=cfg.distill.top_k,
                  parts=[f"part-{r:05d}-of-{world:05d}" for r in range(world)], users=users, positions=positions,
                  git_sha=git_sha())
    E.barrier()  # every part is complete before labels.json says so
    if rank == 0:
        np.save(out / "table.npy", teacher.table.float().cpu().numpy())
        (out / "labels.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"teacher labels: {users:,} users, {positions:,} positions, top-{cfg.distill.top_k} -> {out}")
    E.barrier()
    return record


def read_record(folder: str | Path) -> dict:
    path = Path(folder) / "labels.json"
    if not path.is_file():
        raise LabelError(f"distill.labels: {path} not found (not a finished `python -m train teacher-labels` folder)")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise LabelError(f"distill.labels: {path} is not a {FORMAT} v{FORMAT_VERSION} file")
    return record


def check_identity(record: dict, folder: Path, manifest: dict, data: LoaderConfig) -> None:
    """Refuse labels of another shard set or of other training examples, naming what differs."""
    want, have = example_identity(manifest, data), record["identity"]
    if identity_hash(have) != record["identity_hash"]:
        raise LabelError(f"distill.labels: {folder / 'labels.json'} identity does not match its own hash (edited?)")
    if have["manifest_hash"] != want["manifest_hash"]:
        raise LabelError(f"distill.labels: {folder} was written for another shard set (manifest hash "
                         f"{have['manifest_hash'][:12]}, these shards have {want['manifest_hash'][:12]})")
    if have["domains"] and have["domains"] != want["domains"]:  # labels of every domain serve any subset
        raise LabelError(f"distill.labels: {folder} holds data.domains={have['domains']} only, this run wants "
                         f"{want['domains'] or 'every domain'}")
    for key in ("max_len", "query_tokens", "train_through_valid"):
        if have[key] != want[key]:
            raise LabelError(f"distill.labels: {folder} was written with data.{key}={have[key]}, this run has "
                             f"data.{key}={want[key]}: rerun teacher-labels with --set data.{key}={want[key]}")


class TeacherLabels:
    """Label files -> TeacherTargets for a batch, by user (memory-mapped parts; any world size reads them)."""

    def __init__(self, folder: str | Path, cfg: DistillConfig, manifest: dict, allowed: torch.Tensor, dev):
        self.folder, self.dev, self.k = Path(folder), dev, cfg.distill.top_k
        self.record = rec = read_record(folder)
        check_identity(rec, self.folder, manifest, cfg.data)
        if self.k > rec["top_k"]:
            raise LabelError(f"distill.top_k ({self.k}) exceeds the labels' K ({rec['top_k']}, {self.folder})")
        if cfg.distill.teacher and Path(cfg.distill.teacher).exists() and \
                fingerprint(cfg.distill.teacher) != rec["teacher_fingerprint"]:
            raise LabelError(f"distill.labels: {self.folder} was written by another teacher than "
                             f"{cfg.distill.teacher} (its config.json/metrics.json differ)")
        self.parts, self.where = [], {}  # user -> (part, first position, count)
        for i, name in enumerate(rec["parts"]):
            try:
                part = {k: np.load(self.folder / name / f"{k}.npy", mmap_mode="r")
                        for k in ("users", "counts", *FIELDS)}
            except FileNotFoundError as e:
                raise LabelError(f"distill.labels: {e.filename} missing (an incomplete copy of {self.folder})") from e
            starts = np.concatenate([[0], np.cumsum(part["counts"])[:-1]]).astype(np.int64)
            for u, s, c in zip(part["users"].tolist(), starts.tolist(), part["counts"].tolist()):
                if u in self.where:
                    raise LabelError(f"distill.labels: user {u} appears twice in {self.folder}")
                self.where[u] = (i, s, c)
            self.parts.append(part)
        self.table = torch.from_numpy(np.load(self.folder / "table.npy")).to(dev)
        self.temperature = float(rec["teacher_temperature"])
        self.fallback = torch.nonzero(allowed).flatten()[:self.k].to(dev)  # valid ids for dummy batches

    def __call__(self, batch, real: bool = True) -> TeacherTargets:
        counts = _user_counts(batch).tolist()
        if not real:  # a lock-step dummy (its loss is x 0): any valid targets of the right shapes
            P = sum(counts)
            return TeacherTargets(self.table.new_zeros(P, self.table.shape[1]), self.fallback.expand(P, -1),
                                  self.table.new_zeros(P, self.k), self.table, self.temperature)
        rows = {k: [] for k in FIELDS}
        for u, want in zip(batch.user.tolist(), counts):
            if u not in self.where:
                raise LabelError(f"distill.labels: no labels for user {u} in {self.folder}")
            i, s, c = self.where[u]
            if c != want:
                raise LabelError(f"distill.labels: user {u} has {c} labelled positions in {self.folder}, this run's "
                                 f"training example has {want} (labels of other training examples)")
            for k in FIELDS:  # topk columns are best first: the first distill.top_k of the labels' K
                a = self.parts[i][k][s:s + c]
                rows[k].append(a[:, :self.k] if k.startswith("topk") else a)
        got = {k: torch.from_numpy(np.concatenate(v)).to(self.dev) for k, v in rows.items()}
        if not torch.equal(got["targets"], batch.targets[batch.targets > 0]):
            raise LabelError(f"distill.labels: the targets in {self.folder} differ from this batch's training targets "
                             "(labels of other training examples)")
        return TeacherTargets(got["states"], got["topk_ids"].long(), got["topk_logits"], self.table, self.temperature)
