"""--merge-domain NAME: a model with per-domain parameters -> that one domain's single-domain model.

    merged, diff = merge_domain(model, facts, domains, "books")

Each MLoRA adapter of domain d is folded into its layer's W (model.lora.merged_state: W + scale (A_d B_d)^T,
the layer a plain nn.Linear again, adapters 'none'); a domain embedding keeps row d alone (num_domains 1,
so the merged model reads domain id 0). The merged model is checked against the unmerged one run with
domain d, on the random histories of the program check (train/export.py), before anything is written.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from model.lora import merged_state
from model.seqrec import SeqRecModel, model_from_state
from train.export import TOLERANCE, ExportError, check_lengths, random_histories


def merged_model(model: SeqRecModel, facts: dict, domain: int) -> SeqRecModel:
    """The eval-mode single-domain model equal to `model` on sequences of domain `domain`. facts: what
    model_from_state reads (num_items, num_queries, max_len, level_sizes)."""
    state = merged_state(model, domain)  # adapters folded into W; every other tensor as it is
    if model.domain_emb is not None:
        state["domain_emb.weight"] = state["domain_emb.weight"][domain:domain + 1].clone()  # (1, D)
    return model_from_state(replace(model.cfg, adapters="none"), {**facts, "num_domains": 1}, state)


@torch.no_grad()
def verify_merge(merged: SeqRecModel, model: SeqRecModel, domain: int, max_len: int, seed: int = 0) -> float:
    """Max |merged(h, domain 0) - model(h, domain `domain`)| over random histories of lengths 1..max_len;
    raises ExportError above TOLERANCE."""
    gen, worst, num_items = torch.Generator().manual_seed(seed), 0.0, model.embed.item.num_items
    for lengths in check_lengths(max_len, gen):
        batch = random_histories(num_items, max_len, lengths, gen)["batch"]
        dom = torch.full((len(lengths),), domain)
        want = model(replace(batch, domain=dom), last_only=True)
        got = merged(replace(batch, domain=torch.zeros_like(dom)), last_only=True)
        worst = max(worst, float((got - want).abs().max()))
        if not worst <= TOLERANCE:  # NaN fails too
            raise ExportError(f"the merged model differs from the adapted one by {worst:.3g} (> {TOLERANCE}) on "
                              f"histories of lengths {lengths}")
    return worst


def merge_domain(model: SeqRecModel, facts: dict, domains: list[str], name: str) -> tuple[SeqRecModel, float]:
    """(the merged model of domain `name`, its max |diff| against the unmerged model). Raises ExportError
    for a name that is not one of `domains` (the shard set's) and for a model without per-domain parameters."""
    if name not in domains:
        raise ExportError(f"--merge-domain {name!r}: not a domain of this run; its domains are {domains}")
    if not model.per_domain:
        raise ExportError(f"--merge-domain {name!r}: this model has no per-domain parameters (model.adapters "
                          f"{model.cfg.adapters!r}, no domain_embedding), so there is nothing to merge: export it "
                          "without --merge-domain")
    d = domains.index(name)
    merged = merged_model(model, facts, d)
    return merged, verify_merge(merged, model, d, facts["max_len"])
