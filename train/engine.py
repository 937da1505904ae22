"""The only file that imports DeepSpeed: process group, engine, checkpoints, collectives.

One code path for every launch: `deepspeed --num_gpus N -m train ...`, `torchrun`, or a plain
`python -m train ...` (world size 1, still a DeepSpeed engine). On CPU the backend is gloo.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch

from configs.hardware import cpu_has_native_bf16
from configs.schema import TrainConfig
from data_pipeline.atomic_dir import recover, swap_into_place


def setup_distributed() -> tuple[int, int]:
    """Initialise the process group once; returns (rank, world_size). A plain `python` run (no launcher)
    gets a one-process group over an in-memory store: no TCP port at all. Picking a free port and then
    binding it raced with other processes on CI (EADDRINUSE on port 40217, 2026-12-02); a launcher's
    torchrun/deepspeed rendezvous owns the port otherwise."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend)  # wraps an existing group, else rendezvous by env
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(precision: str, dev: torch.device) -> str:
    """'fp32' or 'bf16': `precision`, with 'auto' = bf16 where `dev` computes it natively (see TrainConfig).
    An explicit 'bf16' on a CPU without native bf16 runs (emulated, slowly) with a warning."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"train.precision must be fp32, bf16 or auto, got {precision!r}")
    native = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_native_bf16()
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        warnings.warn("train.precision=bf16 on a CPU without native bf16 (no avx512_bf16/amx_bf16): torch "
                      "emulates it, ~30x slower than fp32 here; train.precision=auto picks fp32 on such a CPU")
    return precision


def ds_config(cfg: TrainConfig, micro_batch: int, world: int) -> dict:
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16 here (resolve 'auto' first), got {cfg.precision!r}")
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


def build_engine(model: torch.nn.Module, cfg: TrainConfig, micro_batch: int,
                 content_params: list[torch.nn.Parameter] = ()):
    """DeepSpeed engine around `model` with torch AdamW as the client optimizer (DeepSpeed's own Adam
    would JIT-compile a fused kernel: ~80 s on first use, measured on this machine kind). fused=True: one
    kernel for all parameters; HSTU-large's 298k parameters, 1 thread: 5.5 ms per step for-loop, 3.5
    foreach, 1.2 fused (2026-12-01) - small next to a ~2 s step, but free. `content_params` (the item
    code/content parts) get their own group with train.content_weight_decay and train.content_lr_mult."""
    # only what trains: `adapt` freezes the backbone (requires_grad False) and trains the adapters alone
    special = {id(p) for p in content_params}
    groups = [dict(params=[p for p in model.parameters() if p.requires_grad and id(p) not in special],
                   lr_mult=1.0)]
    content = [p for p in content_params if p.requires_grad]
    if content:
        decay = cfg.weight_decay if cfg.content_weight_decay < 0 else cfg.content_weight_decay
        groups.append(dict(params=content, lr=cfg.lr * cfg.content_lr_mult, lr_mult=cfg.content_lr_mult,
                           weight_decay=decay))
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=ds_config(cfg, micro_batch, dist.get_world_size()))
    return engine


def gathered(params: list[torch.nn.Parameter], modify: bool = False):
    """Context in which ZeRO-3-partitioned `params` are whole on every rank (a no-op below stage 3); with
    `modify`, what rank 0 writes into them is partitioned back to every rank on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def set_lr(engine, lr: float) -> float | None:
    """Set the (constant) learning rate of every parameter group; returns the previous one. A resumed
    run restores the optimizer state, lr included: the config's lr must win, or resuming a diverged run
    with a lower train.lr would silently keep the old one."""
    groups = engine.optimizer.param_groups
    old = groups[0]["lr"] / groups[0].get("lr_mult", 1.0)
    for g in groups:  # a group's lr_mult (train.content_lr_mult) survives the reset
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return old


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG stream a rank draws from: python, numpy, torch CPU, each visible CUDA device (dropout on
    GPU draws from those, not from the CPU stream), and the negatives' generator."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                 generator=generator.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if torch.cuda.is_available():
        if "cuda" not in state:
            raise ValueError("this checkpoint has no CUDA RNG state (saved on CPU): a resumed GPU run "
                             "would not reproduce an uninterrupted one")
        torch.cuda.set_rng_state_all(state["cuda"])


def _partial(tag: str) -> str:
    return f".{tag}.partial"


def save_checkpoint(engine, ckpt_dir: str | Path, tag: str, client_state: dict, generator: torch.Generator):
    """DeepSpeed state (model, optimizer, ZeRO partitions) + this rank's RNG streams, written as
    ckpt_dir/.<tag>.partial and swapped into ckpt_dir/<tag> only once every rank has finished: a crash
    at any moment leaves the previous complete <tag> in place (DeepSpeed writes client_state from rank
    0 only, so every rank saves its own RNG file next to it)."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / _partial(tag)
    if dist.get_rank() == 0:
        recover(ckpt_dir / tag)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash inside an earlier save
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state)
    torch.save(rng_state(generator), tmp / f"rng_rank{dist.get_rank()}.pt")
    hold_tag, _, hold_s = os.environ.get("UNIREC_TEST_SAVE_SLEEP", "").partition(":")
    if hold_tag == tag:  # test hook "TAG:SECONDS": hold this save open so a test can kill -9 it here
        time.sleep(float(hold_s))
    dist.barrier()  # every rank's files are complete
    if dist.get_rank() == 0:
        swap_into_place(tmp, ckpt_dir / tag)
        (ckpt_dir / "latest").write_text(tag)  # DeepSpeed's pointer; we always load by explicit tag
    dist.barrier()


def has_checkpoint(ckpt_dir: str | Path, tag: str) -> bool:
    recover(Path(ckpt_dir) / tag)
    return (Path(ckpt_dir) / tag).is_dir()


def load_checkpoint(engine, ckpt_dir: str | Path, tag: str, generator: torch.Generator | None,
                    with_optimizer: bool = True) -> dict:
    """Restore engine state (and RNG streams if a generator is given); returns client_state."""
    if not has_checkpoint(ckpt_dir, tag):
        raise FileNotFoundError(f"no checkpoint {Path(ckpt_dir) / tag}")
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


def visible_grad_norm(engine) -> float | None:
    """Global gradient norm before the optimizer step, where this process can see it: at ZeRO 0 the
    gradients are whole and already all-reduced (the same on every rank). ZeRO >= 1 partitions them
    inside DeepSpeed's optimizer, which checks them itself (see `step`); None there."""
    if engine.zero_optimization_stage() > 0:
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def skip_update(engine) -> None:
    """Drop the accumulated gradients without an optimizer step (ZeRO 0; see visible_grad_norm)."""
    engine.zero_grad()


def step(engine) -> tuple[bool, float | None]:
    """engine.step(); returns (applied, grad_norm). ZeRO >= 1 and bf16 optimizers check the gradients
    for inf/NaN themselves and skip such an update (DeepSpeed counts it in skipped_steps): applied is
    then False. grad_norm is DeepSpeed's global norm where its optimizer reports one, else None."""
    skipped = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return engine.skipped_steps == skipped, norm


def micro_steps(engine) -> int:
    """Micro-batches this engine has stepped (backward + step pairs), the same on every rank."""
    return engine.micro_steps


def per_rank(value: float) -> list[float]:
    """[value on rank 0, value on rank 1, ...] on every rank (one all-reduce)."""
    x = torch.zeros(dist.get_world_size(), dtype=torch.float64)
    x[dist.get_rank()] = value
    return all_reduce_sum(x).tolist()


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter teardown, gloo's C++ worker
    threads are destroyed while still joinable and the process aborts ("terminate called without an active
    exception", rc -6) after all its work is done: 1 in ~2 CI runs of the 3-rank test on 2 cores,
    2026-12-03; pytorch/pytorch#190489). No barrier first: a rank that failed must not hang the others."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dist.destroy_process_group()


def write_json(path: str | Path, obj) -> None:
    """Write JSON on rank 0 only."""
    if dist.get_rank() == 0:
        Path(path).write_text(json.dumps(obj, indent=2, default=str) + "\n")
