"""MLoRA (Yang et al., RecSys 2024): per-domain low-rank adapters on one shared dense layer.

    y = W x + b + scale * B_d (A_d dropout(x))        d = the domain of x's row (each token: its sequence's)

A_d (in x r), B_d (r x out) per domain, B zero-initialised: an untrained adapter changes nothing. Rows of
different domains share one call, so a batch may mix domains in training and in serving, and the backbone
runs once per batch, never once per domain. `merged_weight(d)` folds domain d's adapter into W for a
single-domain export.

The adapter term of a mixed batch is two dense matmuls over every domain's factors side by side,
x (N, in) @ [A_0 .. A_Dm-1] (in, Dm r) -> (N, Dm, r), zeroed outside each row's own domain, @ [B_0; ..]
(Dm r, out): exact (the other domains' products are multiplied by 0, so their gradients are 0 too), no
data-dependent shapes (torch.export traces the same code), (N, Dm r) extra memory. Its cost grows with
Dm r (ML-1M by age: 7 x 3 = 21 columns against the layer's 50 -> 200). Fwd + bwd of the adapter term
alone for the HSTU uvqk layer on one ML-1M batch (25,600 rows, 50 -> 200, 7 domains, r 3, 2 threads, one
run on a shared machine): this form 35.6 ms against the base nn.Linear's 38.8 ms; the two forms it
replaced: one matmul pair per domain + index_add 436 ms (what made MLoRA's ML-1M train step 22.7% slower
than the shared model's), A_d / B_d gathered per row + bmm 236 ms.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn


def lora_rank(in_features: int, alpha: int, rank: int = 0) -> int:
    """MLoRA's rank r = width / alpha (at least 1), or `rank` when it is given (> 0)."""
    if rank > 0:
        return rank
    if alpha < 1:
        raise ValueError(f"adapter alpha must be >= 1, got {alpha}")
    return max(1, in_features // alpha)


class DomainLoRALinear(nn.Module):
    """A frozen-or-not nn.Linear `base` + one low-rank adapter per domain; forward(x (N, in), domains (N,))."""

    def __init__(self, base: nn.Linear, num_domains: int, rank: int, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if num_domains < 1 or rank < 1:
            raise ValueError(f"need num_domains >= 1 and rank >= 1, got {num_domains} and {rank}")
        self.base, self.num_domains, self.rank, self.scale = base, num_domains, rank, float(scale)
        self.A = nn.Parameter(torch.empty(num_domains, base.in_features, rank))  # (Dm, in, r)
        self.B = nn.Parameter(torch.zeros(num_domains, rank, base.out_features))  # (Dm, r, out): zero = no change
        nn.init.normal_(self.A, std=1.0 / math.sqrt(base.in_features))  # LoRA's A init scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """x (..., in), domains (...) with one domain id per row of x -> (..., out)."""
        y = self.base(x)  # (..., out)
        flat, dom = x.reshape(-1, x.shape[-1]), domains.reshape(-1)  # (N, in), (N,)
        if dom.numel() != flat.shape[0]:
            raise ValueError(f"domains has {dom.numel()} entries for {flat.shape[0]} rows")
        Dm, r = self.num_domains, self.rank
        if dom.numel() and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            lo, hi = int(dom.min()), int(dom.max())  # an id outside would silently get no adapter below
            if lo < 0 or hi >= Dm:
                raise ValueError(f"domain id {lo if lo < 0 else hi} outside 0..{Dm - 1}")
        hA = (self.dropout(flat) @ self.A.permute(1, 0, 2).reshape(-1, Dm * r)).view(-1, Dm, r)  # (N, Dm, r)
        own = (dom[:, None] == torch.arange(Dm, device=dom.device)).to(hA.dtype)[:, :, None]  # (N, Dm, 1)
        delta = (hA * own).view(-1, Dm * r) @ self.B.reshape(Dm * r, -1)  # (N, out)
        return y + self.scale * delta.view(y.shape)

    def merged_weight(self, domain: int) -> torch.Tensor:
        """W + scale * (A_d B_d)^T (out, in): nn.Linear's layout, so y = x W'^T + b equals forward for d."""
        return self.base.weight + self.scale * (self.A[domain] @ self.B[domain]).T

    def merged_linear(self, domain: int) -> nn.Linear:
        lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight(domain))
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin.to(self.base.weight.device, self.base.weight.dtype)


def dense(layer: nn.Module, x: torch.Tensor, domains: torch.Tensor | None) -> torch.Tensor:
    """Apply a block's dense layer: an adapted one with the rows' domains, a plain nn.Linear as it is."""
    if isinstance(layer, DomainLoRALinear):
        if domains is None:
            raise ValueError("this model has per-domain adapters: pass the domain of every sequence")
        return layer(x, domains)
    return layer(x)


def add_domain_adapters(model: nn.Module, patterns: list[str], num_domains: int, alpha: int = 16,
                        rank: int = 0, scale: float = 1.0, dropout: float = 0.0) -> list[str]:
    """Replace every nn.Linear whose qualified name matches one of `patterns` (regular expressions, full
    match) by a DomainLoRALinear around it; returns the replaced names. A pattern that matches nothing is
    an error (a misspelt layer name would otherwise train no adapter at all)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n, _ in linears if any(re.fullmatch(p, n) for p in patterns)]
    unmatched = [p for p in patterns if not any(re.fullmatch(p, n) for n, _ in linears)]
    if unmatched:
        raise ValueError(f"adapter patterns {unmatched} match no nn.Linear; linear layers: {[n for n, _ in linears]}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, DomainLoRALinear(base, num_domains, lora_rank(base.in_features, alpha, rank),
                                                scale, dropout))
    return chosen


def adapter_layers(model: nn.Module) -> dict[str, DomainLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DomainLoRALinear)}


def domain_adapter_state(model: nn.Module, domain: int) -> dict[str, torch.Tensor]:
    """One domain's factors alone ({name.A: (in, r), name.B: (r, out)}): what adapters/<domain>.safetensors holds."""
    out = {}
    for name, layer in adapter_layers(model).items():
        out[f"{name}.A"] = layer.A[domain].detach().clone()
        out[f"{name}.B"] = layer.B[domain].detach().clone()
    return out


def load_domain_adapter(model: nn.Module, domain: int, state: dict[str, torch.Tensor]) -> None:
    """Write one domain's factors into the model; every adapter layer must be present with its shapes."""
    layers = adapter_layers(model)
    want = {f"{n}.{p}" for n in layers for p in ("A", "B")}
    if set(state) != want:
        raise ValueError(f"adapter state keys differ: missing {sorted(want - set(state))}, "
                         f"unexpected {sorted(set(state) - want)}")
    with torch.no_grad():
        for name, layer in layers.items():
            for p in ("A", "B"):
                t, dst = state[f"{name}.{p}"], getattr(layer, p)[domain]
                if t.shape != dst.shape:
                    raise ValueError(f"{name}.{p}: shape {tuple(t.shape)}, the model has {tuple(dst.shape)}")
                dst.copy_(t)


def _backbone_key(key: str, layers: dict) -> str | None:
    """A state key of the adapted model -> the same tensor's key in the model without adapters
    (`<layer>.base.weight` -> `<layer>.weight`); None for an adapter factor (A, B)."""
    name, _, leaf = key.rpartition(".")
    if name in layers:
        return None
    owner, _, part = name.rpartition(".")
    return f"{owner}.{leaf}" if part == "base" and owner in layers else key


def merged_state(model: nn.Module, domain: int) -> dict[str, torch.Tensor]:
    """The model's state with domain `domain`'s adapters folded into W: each adapted layer's
    `<name>.base.weight/bias` become `<name>.weight/bias` (W + scale (A_d B_d)^T) and its A, B go. Loads into
    the same model built with model.adapters='none': a single-domain model, one matmul per layer again."""
    layers = adapter_layers(model)
    out = {}
    for key, t in model.state_dict().items():
        plain = _backbone_key(key, layers)
        if plain is None:
            continue
        if plain != key and key.endswith(".weight"):
            t = layers[plain.rpartition(".")[0]].merged_weight(domain).detach().clone()
        out[plain] = t
    return out


def is_adapter_param(name: str) -> bool:
    return name.endswith((".A", ".B"))


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a model without adapters (`state`, e.g. a pretrained run's weights) into the same model built
    with adapters: `<layer>.weight` -> `<layer>.base.weight`; the adapters keep their init (B = 0, so the
    model starts as exactly the pretrained one). Every backbone tensor must be there, with its shape, and
    nothing else."""
    layers = adapter_layers(model)
    own = model.state_dict()
    source = {key: src for key in own if (src := _backbone_key(key, layers)) is not None}
    missing = sorted(k for k in source.values() if k not in state)
    extra = sorted(set(state) - set(source.values()))
    if missing or extra:
        raise ValueError(f"the base weights do not fit this model: missing {missing[:5]}, unexpected {extra[:5]} "
                         "(was the base trained with the same model config and shard set?)")
    with torch.no_grad():
        for key, src in source.items():
            if own[key].shape != state[src].shape:
                raise ValueError(f"{src}: shape {tuple(state[src].shape)}, the model has {tuple(own[key].shape)}")
            own[key].copy_(state[src])
