"""One training epoch: every example exactly once, lock-step across ranks, guarded against NaN/inf.

- Lock-step: ranks hold different numbers of batches (shards and users differ in size). A rank that
  runs out first feeds one-token dummy batches with loss x 0 until every rank is done, so each
  optimizer step's gradient all-reduce has all ranks and no rank's data is dropped (issue 11: the old
  loop stopped every rank at the shortest, and lost 23% of the users on 3 ranks).
- The epoch ends on a gradient-accumulation boundary (zero-weight micro-batches fill the last window),
  so a checkpoint never misses half-accumulated gradients and a resumed run equals an uninterrupted one.
- `NonFiniteGuard`: a non-finite loss (checked on every rank, agreed by one all-reduce) or gradient norm
  stops the run with a message naming the step, the loss term and the last good checkpoint, or, with
  train.nan_policy = skip_step, drops that update on every rank (at most train.max_skipped_steps times).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configs.schema import PretrainConfig, TrainConfig
from data_pipeline.collate import collate, make_loader
from train import engine as E
from train.losses import compute_loss

LOSS_TERMS = ("retrieval", "generative", "distill", "hidden")  # any a loss reports (absent = finite)


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; the message names the step, the loss term and the last good checkpoint."""


def dummy_batch(dev, item: int = 1, seen: bool = False):
    """A one-token batch for lock-step steps on a rank that ran out of data. In training, `item` must be a
    trainable (warm) item: the generative loss walks its tuple in the warm items' trie. `seen` adds the
    empty full history that evaluation batches carry."""
    z = np.zeros(1, dtype=np.int64)
    tok = dict(item_ids=z + item, query_ids=z, timestamps=z, next_timestamps=z, actions=z, token_types=z,
               domains=z, targets=z + item, domain=0, user=0)
    if seen:
        tok["seen"] = np.zeros(0, dtype=np.int64)
    return collate([tok]).to(dev)


class NonFiniteGuard:
    """Decides, the same way on every rank, what to do with a non-finite loss or gradient norm."""

    def __init__(self, cfg: TrainConfig, ckpt: Path, skipped: int = 0):
        if cfg.nan_policy not in ("stop", "skip_step"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip_step', got {cfg.nan_policy!r}")
        self.cfg, self.ckpt, self.skipped = cfg, ckpt, skipped
        self.last_good_epoch = -1  # set by the caller: the epoch ckpt/last holds

    def _bad(self, what: str, epoch: int, eng, force_stop: bool = False) -> None:
        """Count a skipped update, or raise when the policy (or the skip budget, or `force_stop`) says stop."""
        where = f"epoch {epoch}, optimizer step {eng.global_steps + 1}"
        if self.cfg.nan_policy == "skip_step" and self.skipped < self.cfg.max_skipped_steps and not force_stop:
            self.skipped += 1
            if E.rank() == 0:
                print(f"warning: {what} at {where}: update skipped on every rank "
                      f"({self.skipped}/{self.cfg.max_skipped_steps} allowed, train.nan_policy=skip_step)")
            return
        budget = (f" after {self.skipped} skipped updates (train.max_skipped_steps={self.cfg.max_skipped_steps})"
                  if self.cfg.nan_policy == "skip_step" else "")
        last = self.ckpt / "last"
        good = (f"{last} (after epoch {self.last_good_epoch}), left untouched: fix the cause (e.g. a lower "
                "train.lr or train.grad_clip > 0) and rerun with --resume"
                if self.last_good_epoch >= 0 else "none yet (the run diverged in its first epoch)")
        raise NonFiniteError(f"{what} at {where}: training stopped (train.nan_policy={self.cfg.nan_policy}"
                             f"{budget}). Last good checkpoint: {good}")

    def loss_ok(self, m: dict, epoch: int, eng) -> bool:
        """False when any rank's loss is non-finite (then nobody runs backward for this micro-batch)."""
        bad = torch.tensor([0.0 if math.isfinite(m["terms"].get(t, 0.0)) else 1.0 for t in LOSS_TERMS])
        bad = E.all_reduce_sum(bad)
        if not bool((bad > 0).any()):
            return True
        names = ", ".join(t for t, b in zip(LOSS_TERMS, bad.tolist()) if b > 0)
        self._bad(f"non-finite loss (term: {names})", epoch, eng)
        return False

    def step(self, eng, epoch: int) -> bool:
        """At an accumulation boundary: check the gradient norm where it is visible, then step. True if
        the update was applied."""
        norm = E.visible_grad_norm(eng)  # ZeRO 0: whole, all-reduced gradients, the same on every rank
        if norm is not None and not math.isfinite(norm):
            E.skip_update(eng)
            self._bad(f"non-finite gradient norm ({norm})", epoch, eng)
            return False
        applied, ds_norm = E.step(eng)
        if not applied:  # ZeRO >= 1 / bf16: DeepSpeed found inf/NaN gradients and did not update
            self._bad(f"non-finite gradient norm ({ds_norm}; DeepSpeed skipped the update)", epoch, eng)
        elif ds_norm is not None and not math.isfinite(ds_norm):  # the weights are hit: nothing to skip
            self._bad(f"non-finite gradient norm ({ds_norm}) applied by the optimizer", epoch, eng, force_stop=True)
        return applied


def _closing(bar):
    """Iterate a tqdm bar and clear it however the loop ends (a NonFiniteError message then starts on a
    clean line)."""
    try:
        yield from bar
    finally:
        bar.close()


def train_epoch(eng, cfg: PretrainConfig, epoch: int, num_items: int, gen, dev, log, guard: NonFiniteGuard,
                candidates: torch.Tensor | None, loss_fn=None) -> dict:
    """One pass over the train split; returns the epoch's row for log.jsonl. `loss_fn(eng, batch, real)
    -> (loss, metrics)` replaces compute_loss (distillation adds the teacher; `real` is False on the
    lock-step dummy batches, whose loss is multiplied by 0)."""
    if loss_fn is None:
        loss_fn = lambda eng, batch, real: compute_loss(eng, batch, cfg.loss, num_items, gen, candidates)
    eng.train()
    rank = E.rank()
    pad_item = 1 if candidates is None else int(candidates[0])
    t0, tokens, examples, losses, steps = time.perf_counter(), 0, 0, [], 0
    batches = E.lockstep(make_loader(cfg.shards, "train", cfg.data, epoch=epoch), lambda: dummy_batch(dev, pad_item))

    def micro(batch, real: bool) -> bool:
        """Forward, backward and (at a boundary) step one micro-batch; True when an update was applied."""
        loss, m = loss_fn(eng, batch.to(dev), real)
        if not guard.loss_ok(m, epoch, eng):
            return False
        eng.backward(loss if real else loss * 0.0)  # a dummy only keeps the collectives matched
        if real:
            losses.append(m["loss"])
        if not eng.is_gradient_accumulation_boundary():
            eng.step()  # inside an accumulation window: DeepSpeed only counts the micro-batch
            return False
        return guard.step(eng, epoch)

    users = [] if os.environ.get("UNIREC_TEST_USERS_DIR") else None  # test hook: who trained where
    bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=rank != 0, leave=False)
    for batch, real in _closing(bar):
        tokens += batch.item_ids.numel() if real else 0
        examples += batch.num_sequences if real else 0
        if users is not None and real:
            users += batch.user.tolist()
        if micro(batch, real):
            steps += 1
            if steps % cfg.train.log_every == 0:
                rate = tokens / (time.perf_counter() - t0)
                log(dict(epoch=epoch, step=eng.global_steps, loss=losses[-1] if losses else None, lr=cfg.train.lr,
                         tokens_per_s=round(rate)))
                bar.set_postfix(loss=f"{losses[-1] if losses else math.nan:.3f}", tok_s=f"{rate:,.0f}")
        if cfg.train.max_steps_per_epoch and steps >= cfg.train.max_steps_per_epoch:
            break  # the same step on every rank: steps only count lock-step updates
    while E.micro_steps(eng) % cfg.train.grad_accum:  # end the epoch on an accumulation boundary
        steps += micro(dummy_batch(dev, pad_item), False)
    secs = time.perf_counter() - t0
    if users is not None:
        (Path(os.environ["UNIREC_TEST_USERS_DIR"]) / f"epoch{epoch}_rank{rank}.json").write_text(json.dumps(users))
    per_rank = [int(x) for x in E.per_rank(examples)]
    all_tokens = int(sum(E.per_rank(tokens)))  # tokens and tokens_per_s: all ranks together
    return dict(epoch=epoch, steps=steps, seconds=round(secs, 2), tokens=all_tokens,
                loss=float(np.mean(losses)) if losses else None, tokens_per_s=round(all_tokens / secs) if secs else 0,
                examples=sum(per_rank), examples_per_rank=per_rank, skipped_steps=guard.skipped)
