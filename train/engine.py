"""The only file that imports DeepSpeed: process group, engine, checkpoints, collectives.

One code path for every launch: `deepspeed --num_gpus N -m train ...`, `torchrun`, or a plain
`python -m train ...` (world size 1, still a DeepSpeed engine). On CPU the backend is gloo.
"""
from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch

from configs.schema import TrainConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int]:
    """Initialise the process group once; returns (rank, world_size). A plain `python` run gets the
    environment of a one-process group (DeepSpeed otherwise looks for MPI and fails)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ds_config(cfg: TrainConfig, micro_batch: int, world: int) -> dict:
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0-3, got {cfg.zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, cfg: TrainConfig, micro_batch: int):
    """DeepSpeed engine around `model` with torch AdamW as the client optimizer (DeepSpeed's own Adam
    would JIT-compile a fused kernel: ~80 s on first use, measured on this machine kind)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=ds_config(cfg, micro_batch, dist.get_world_size()))
    return engine


def rng_state(generator: torch.Generator) -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                generator=generator.get_state())


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def save_checkpoint(engine, ckpt_dir: str | Path, tag: str, client_state: dict, generator: torch.Generator):
    """DeepSpeed state (model, optimizer, ZeRO partitions) + this rank's RNG streams. DeepSpeed writes
    client_state from rank 0 only, so every rank saves its own RNG file next to it."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_state(generator), Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank()}.pt")
    dist.barrier()


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, generator: torch.Generator | None,
                    with_optimizer: bool = True) -> dict:
    """Restore engine state (and RNG streams if a generator is given); returns client_state."""
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=with_optimizer,
                                          load_lr_scheduler_states=with_optimizer)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {tag!r} in {ckpt_dir}")
    if generator is not None:
        rng = torch.load(Path(ckpt_dir) / tag / f"rng_rank{dist.get_rank()}.pt", weights_only=False)
        set_rng_state(rng, generator)
    return client or {}


def consolidated_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights from a checkpoint of any ZeRO stage. Stage 0 has no ZeRO partitions to merge (and
    DeepSpeed's merger raises a TypeError there), so its module state is read directly."""
    tag_dir = Path(ckpt_dir) / tag
    if any(tag_dir.glob("*zero_pp_rank_*")):  # ZeRO 1-3: merge the fp32 master partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in state["module"].items()}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the collective's device, returned on the input's device)."""
    if dist.get_world_size() == 1:
        return t
    x = t.to(device())
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def _with_rank_count(batches):
    """Yield (batch or None, how many ranks have a batch at this step), one collective per step."""
    it = iter(batches)
    while True:
        b = next(it, None)
        yield b, int(all_reduce_sum(torch.tensor([0.0 if b is None else 1.0])).item())


def lockstep(batches, make_dummy):
    """Yield (batch, is_real) until every rank is out of batches. A rank that runs out early feeds dummy
    batches so collective forwards (ZeRO-3 gathers parameters in forward) stay matched across ranks."""
    for b, have in _with_rank_count(batches):
        if have == 0:
            return
        yield (b, True) if b is not None else (make_dummy(), False)


def while_all_have(batches):
    """Yield batches while every rank has one: ranks' shard shares differ by up to one shard, and an
    optimizer step with a rank missing would hang the gradient all-reduce. The remainder of the longer
    ranks is dropped this epoch (the shard order is reshuffled every epoch, so it is different data)."""
    for b, have in _with_rank_count(batches):
        if have < dist.get_world_size():
            return
        yield b


def barrier() -> None:
    dist.barrier()


def write_json(path: str | Path, obj) -> None:
    """Write JSON on rank 0 only."""
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
