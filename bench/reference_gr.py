"""Training-step throughput (tokens/s) of Meta's generative-recommenders research HSTU, on our ML-1M batches.

What is measured: the reference implementation's own code (generative_recommenders/research: HSTU built by
`hstu_encoder`, LearnablePositionalEmbeddingInputFeaturesPreprocessor, L2NormEmbeddingPostprocessor,
DotProductSimilarity, SampledSoftmaxLoss, LocalNegativesSampler, movielens_seq_features_from_row), set up
like configs/ml-1m/hstu-sampled-softmax-n128[-large]-final.gin and stepped the way
research/trainer/train.py's loop does it: features from the row, scatter the target id, zero_grad, item
embeddings, forward, loss over all positions (ar_mask), backward, AdamW step. Each of the first --warmup
batches is run untimed; each later one is timed with time.perf_counter around that whole step. Tokens = sum
of the encoded sequence lengths (= our batch's L, what bench/throughput.py counts).

Batches: the first warmup + batches train batches from `bench.common.step_batches` (128 sequences cut to
200, loader order), the same function bench/throughput.py times. Each jagged sequence (n tokens, targets = the
next item, 0 on the last token) becomes a row of the reference's ML-1M dataset: historical_ids (B, 200)
zero-padded, history_lengths = n, timestamps, ratings (= our action codes; unused by this model),
target_id 0 and target_timestamp = the last token's next timestamp. So the reference encodes the same n
tokens and supervises the same n - 1 positions as our model; its padded width is their fixed 200 + 11.

Deviations from their training run, all outside the timed model/loss code: no DDP wrapper (one CPU process),
no eval/tensorboard inside the loop, get_weighted_loss skipped (identity with their empty loss_weights),
item table sized by our dense ids (3706 + 1 rows, theirs max raw id 3952 + 1), and torch's anomaly
detection, which train.py switches on for the whole run (a debugging aid), is off unless --detect-anomaly
(on 2 layers here its effect was within run-to-run noise). Where the time goes on CPU (torch profiler, 2
layers): aten::div/mul/neg, mostly the L2 norm (and its backward) of the (L, 128, D) sampled-negative
embeddings that LocalNegativesSampler materialises (~350 MB a batch), were 45% of self CPU time, bmm 15%.

Reproduce (the fbgemm-gpu-cpu release must match the torch ABI: 1.8.0 loads with torch 2.13.0, 1.9.0 not):

    G=/work/.mirror/facebookresearch+generative-recommenders/repo
    git --git-dir=$G worktree add --detach /tmp/gr HEAD
    /work/main/.venv/bin/python -m venv /tmp/grvenv
    /tmp/grvenv/bin/pip install torch==2.13.0 numpy==2.4.6 webdataset==1.0.2 pyyaml gin-config \\
        fbgemm-gpu-cpu==1.8.0
    PYTHONPATH=/work/main /tmp/grvenv/bin/python bench/reference_gr.py --gr /tmp/gr --shards shards/ml-1m \\
        --layers 2 --dim 50 --heads 1 --batches 40 --warmup 3 --negatives 128 [--json OUT]

Without fbgemm_gpu (or gin) importable, plain-PyTorch shims of the three fbgemm ops the research path calls
(and a no-op gin.configurable) are registered in this process only and listed under "shims" in the output;
the reference's model code is never changed. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import STEP_MAX_LEN, add_step_args, step_batches  # noqa: E402
from data_pipeline.collate import JaggedBatch  # noqa: E402
from data_pipeline.read_shards import load_manifest  # noqa: E402

MAX_SEQ_LEN = STEP_MAX_LEN  # 200: train_fn.max_sequence_length in their ML-1M configs = our batches' max_len
GR_OUTPUT_LENGTH = 10  # train_fn's default gr_output_length; the model pads by gr_output_length + 1
_LIB: list = []  # keeps the shim library alive: its registrations vanish when it is collected


def _jagged_index(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq, pos) of each of `total` jagged rows, without a Python loop over sequences."""
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total)
    return seq, torch.arange(total, device=offsets.device) - offsets[:-1][seq]


def shim_complete_cumsum(t_in: torch.Tensor) -> torch.Tensor:
    """fbgemm.asynchronous_complete_cumsum: [0, cumsum(x)...], length n + 1."""
    return torch.cat([t_in.new_zeros(1), torch.cumsum(t_in, 0)])


class _Scatter(torch.autograd.Function):
    """rows (L, *tail) -> `fill`-filled (size, *tail) with row r at index[r]; backward gathers. A hand pair of
    index_put_/index_select: autograd's own index_copy/advanced-index backwards were ~2x slower (measured)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, size: int, fill: float) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_full((size, *rows.shape[1:]), fill).index_put_((index,), rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None, None


class _Gather(torch.autograd.Function):
    """flat (size, *tail) -> flat[index] (L, *tail); backward scatters into zeros (indices are distinct)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = flat.shape[0]
        return flat.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros((ctx.size, *grad.shape[1:])).index_put_((index,), grad), None


def shim_jagged_to_padded_dense(values: torch.Tensor, offsets: list[torch.Tensor], max_lengths: list[int],
                                padding_value: float = 0.0) -> torch.Tensor:
    """fbgemm.jagged_to_padded_dense, one jagged dim: values (L, *tail) -> (B, n, *tail)."""
    (off,), (n,) = offsets, max_lengths
    seq, pos = _jagged_index(off, values.shape[0])
    index = seq * n + pos
    if values.shape[0] and int(pos.max()) >= n:  # fbgemm truncates rows past max_length
        keep = pos < n
        values, index = values[keep], index[keep]
    B = off.numel() - 1
    return _Scatter.apply(values, index, B * n, padding_value).view(B, n, *values.shape[1:])


def shim_dense_to_jagged(dense: torch.Tensor, x_offsets: list[torch.Tensor],
                         total_L: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fbgemm.dense_to_jagged, one jagged dim: dense (B, n, *tail) -> ((L, *tail), offsets)."""
    (off,) = x_offsets
    B, n = dense.shape[:2]
    seq, pos = _jagged_index(off, int(off[-1]) if total_L is None else total_L)
    return _Gather.apply(dense.reshape(B * n, *dense.shape[2:]), seq * n + pos), [off]


def register_fbgemm_shims() -> list[str]:
    """The shims above as torch.ops.fbgemm.* in this process (CompositeImplicitAutograd: their autograd
    comes from the Functions above and torch.cumsum, so no backward kernel needs registering)."""
    lib = torch.library.Library("fbgemm", "DEF")
    _LIB.append(lib)
    lib.define("asynchronous_complete_cumsum(Tensor t_in) -> Tensor")
    lib.define("jagged_to_padded_dense(Tensor values, Tensor[] offsets, SymInt[] max_lengths, "
               "float padding_value=0.0) -> Tensor")
    lib.define("dense_to_jagged(Tensor dense, Tensor[] x_offsets, SymInt? total_L=None) -> (Tensor, Tensor[])")
    shims = dict(asynchronous_complete_cumsum=shim_complete_cumsum, jagged_to_padded_dense=shim_jagged_to_padded_dense,
                 dense_to_jagged=shim_dense_to_jagged)
    for name, fn in shims.items():
        lib.impl(name, fn, "CompositeImplicitAutograd")
    return [f"torch.ops.fbgemm.{n} (plain PyTorch, vectorised; fbgemm_gpu not importable)" for n in shims]


def import_reference(gr: Path) -> tuple[dict, list[str], str | None]:
    """The reference's modules from checkout `gr` (+ any shims used, fbgemm_gpu's version)."""
    shims, fbgemm_version = [], None
    try:
        import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.* CPU kernels)
        fbgemm_version = getattr(fbgemm_gpu, "__version__", "unknown")
    except Exception:  # noqa: BLE001  (ImportError, or OSError when its .so does not match this torch)
        shims += register_fbgemm_shims()
    try:
        import gin  # noqa: F401
    except ImportError:  # only @gin.configurable is used on this path; configured here by explicit kwargs
        sys.modules["gin"] = types.SimpleNamespace(configurable=lambda fn=None, **_: fn)
        shims.append("gin.configurable = identity (gin-config not installed; every argument passed explicitly)")
    sys.path.insert(0, str(gr))
    from generative_recommenders.research.modeling import similarity_utils
    from generative_recommenders.research.modeling.sequential import autoregressive_losses as arl
    from generative_recommenders.research.modeling.sequential import (
        embedding_modules,
        encoder_utils,
        features,
        input_features_preprocessors,
        output_postprocessors,
    )
    from generative_recommenders.research.modeling.sequential.losses import sampled_softmax
    mods = dict(arl=arl, emb=embedding_modules, enc=encoder_utils, feat=features, inp=input_features_preprocessors,
                out=output_postprocessors, ssl=sampled_softmax, sim=similarity_utils)
    return mods, shims, fbgemm_version


def build(m: dict, num_items: int, layers: int, dim: int, heads: int, negatives: int):
    """Model, loss, sampler and optimizer as train_fn builds them for the ML-1M HSTU gin configs."""
    with contextlib.redirect_stdout(sys.stderr):  # their constructors print init notes; stdout ends in JSON
        emb = m["emb"].LocalEmbeddingModule(num_items=num_items, item_embedding_dim=dim)
        interaction, _ = m["sim"].get_similarity_function(module_type="DotProduct", query_embedding_dim=dim,
                                                          item_embedding_dim=dim)
        model = m["enc"].hstu_encoder(  # what get_sequential_encoder("HSTU") calls; gin bindings as kwargs
            max_sequence_length=MAX_SEQ_LEN, max_output_length=GR_OUTPUT_LENGTH + 1, embedding_module=emb,
            similarity_module=interaction,
            input_preproc_module=m["inp"].LearnablePositionalEmbeddingInputFeaturesPreprocessor(
                max_sequence_len=MAX_SEQ_LEN + GR_OUTPUT_LENGTH + 1, embedding_dim=dim, dropout_rate=0.2),
            output_postproc_module=m["out"].L2NormEmbeddingPostprocessor(embedding_dim=dim, eps=1e-6),
            activation_checkpoint=False, verbose=True, num_blocks=layers, num_heads=heads, dqk=dim // heads,
            dv=dim // heads, linear_dropout_rate=0.2)
    loss = m["ssl"].SampledSoftmaxLoss(num_to_sample=negatives, softmax_temperature=0.05, model=model,
                                       activation_checkpoint=False)
    sampler = m["arl"].LocalNegativesSampler(num_items=num_items, item_emb=model._embedding_module._item_emb,
                                             all_item_ids=list(range(1, num_items + 1)), l2_norm=True,
                                             l2_norm_eps=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0)
    return model, loss, sampler, opt


def to_row(b: JaggedBatch) -> dict[str, torch.Tensor]:
    """Our jagged batch -> the dict their ML-1M DataLoader yields (what movielens_seq_features_from_row
    reads), with the whole sequence as history and no separate target (see the module docstring)."""
    B, L = b.num_sequences, b.item_ids.numel()
    lengths = b.lengths
    if int(lengths.max()) > MAX_SEQ_LEN:
        raise ValueError(f"a sequence is longer than the reference's max_sequence_length {MAX_SEQ_LEN}")
    seq, pos = _jagged_index(b.offsets, L)
    pad = lambda x: torch.zeros(B, MAX_SEQ_LEN, dtype=torch.int64).index_put_((seq, pos), x)
    zeros = torch.zeros(B, dtype=torch.int64)
    return dict(history_lengths=lengths.clone(), historical_ids=pad(b.item_ids), historical_ratings=pad(b.actions),
                historical_timestamps=pad(b.timestamps), target_ids=zeros, target_ratings=zeros.clone(),
                target_timestamps=b.next_timestamps[b.offsets[1:] - 1])


def train_step(m: dict, model, ar_loss, sampler, opt, row: dict[str, torch.Tensor]) -> tuple[float, int]:
    """One iteration of research/trainer/train.py's loop body (eval, logging and DDP left out)."""
    seq_features, target_ids, _ = m["feat"].movielens_seq_features_from_row(
        row, device="cpu", max_output_length=GR_OUTPUT_LENGTH + 1)
    seq_features.past_ids.scatter_(dim=1, index=seq_features.past_lengths.view(-1, 1), src=target_ids.view(-1, 1))
    opt.zero_grad()
    input_embeddings = model.get_item_embeddings(seq_features.past_ids)
    seq_embeddings = model(past_lengths=seq_features.past_lengths, past_ids=seq_features.past_ids,
                           past_embeddings=input_embeddings, past_payloads=seq_features.past_payloads)
    supervision_ids = seq_features.past_ids
    sampler._item_emb = model._embedding_module._item_emb
    ar_mask = supervision_ids[:, 1:] != 0
    loss, _ = ar_loss(lengths=seq_features.past_lengths, output_embeddings=seq_embeddings[:, :-1, :],
                      supervision_ids=supervision_ids[:, 1:], supervision_embeddings=input_embeddings[:, 1:, :],
                      supervision_weights=ar_mask.float(), negatives_sampler=sampler,
                      **seq_features.past_payloads)
    loss.backward()
    opt.step()
    return float(loss.detach()), int(seq_features.past_lengths.sum())


def gr_commit(gr: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(gr), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gr", required=True, type=Path, help="work tree of facebookresearch/generative-recommenders")
    add_step_args(p, batches=40)
    p.add_argument("--detect-anomaly", action="store_true", help="as train.py does: autograd anomaly detection on")
    p.add_argument("--json", type=Path, help="also write the result object here")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be divisible by --heads (dqk = dv = dim / heads, as in their configs)")
    mods, shims, fbgemm_version = import_reference(args.gr.resolve())
    torch.manual_seed(0)
    num_items = load_manifest(args.shards)["vocab"]["num_items"]
    rows = [to_row(b) for b in step_batches(p, args)]  # the batches bench/throughput.py times
    model, ar_loss, sampler, opt = build(mods, num_items, args.layers, args.dim, args.heads, args.negatives)
    model.train()
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    tokens, secs, losses = 0, 0.0, []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        loss, toks = train_step(mods, model, ar_loss, sampler, opt, row)
        dt = time.perf_counter() - t0
        losses.append(round(loss, 4))
        if i >= args.warmup:
            secs, tokens = secs + dt, tokens + toks
    timed = losses[args.warmup:]
    hstu = "generative_recommenders.research.modeling.sequential.hstu"
    result = dict(
        tokens=tokens, seconds=round(secs, 3), tokens_per_s=round(tokens / secs),
        gr_commit=gr_commit(args.gr), gr_path=str(args.gr.resolve()), shims=shims, fbgemm_gpu=fbgemm_version,
        torch=torch.__version__, threads=torch.get_num_threads(), detect_anomaly=args.detect_anomaly,
        loss_first_timed=timed[0], loss_last_timed=timed[-1], losses=losses,
        config=dict(layers=args.layers, dim=args.dim, heads=args.heads, dqk=args.dim // args.heads,
                    dv=args.dim // args.heads, negatives=args.negatives, batch=128, max_len=MAX_SEQ_LEN,
                    padded_len=MAX_SEQ_LEN + GR_OUTPUT_LENGTH + 1, linear_dropout=0.2, attn_dropout=0.0,
                    emb_dropout=0.2, temperature=0.05, lr=1e-3, betas=[0.9, 0.98], weight_decay=0.0,
                    warmup=args.warmup, timed_batches=args.batches),
        reference=[f"{hstu}.HSTU (via encoder_utils.hstu_encoder)", f"{hstu}.SequentialTransductionUnitJagged",
                   f"{hstu}.RelativeBucketedTimeAndPositionBasedBias",
                   "research.modeling.sequential.embedding_modules.LocalEmbeddingModule",
                   "research.modeling.sequential.input_features_preprocessors."
                   "LearnablePositionalEmbeddingInputFeaturesPreprocessor",
                   "research.modeling.sequential.output_postprocessors.L2NormEmbeddingPostprocessor",
                   "research.rails.similarities.dot_product_similarity_fn.DotProductSimilarity",
                   "research.modeling.sequential.losses.sampled_softmax.SampledSoftmaxLoss",
                   "research.modeling.sequential.autoregressive_losses.LocalNegativesSampler",
                   "research.modeling.sequential.features.movielens_seq_features_from_row",
                   "step: research/trainer/train.py loop body (no DDP, eval, logging)"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
