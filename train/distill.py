"""Distillation: a frozen teacher run -> a student model of any config trained on the teacher's rankings.

    python -m train distill --teacher runs/ml1m_hstu_large --config configs/distill/ml1m_large_to_small.yaml
    python -m train teacher-labels --teacher runs/ml1m_hstu_large --out labels/ml1m_large \\
        --config configs/distill/ml1m_large_to_small.yaml          # once; then --set distill.labels=labels/ml1m_large
    deepspeed --num_gpus 2 -m train distill ...                      any launcher, as pretraining

    teacher run (frozen: eval, no grad; adapters and query path as it was built) or its label files
    -> student (shards, data, model, loss, train, eval keys as in pretraining) -> DeepSpeed engine
    -> per batch: kd.task_weight x the pretraining loss + kd.kd_weight x T^2 KL(teacher || student) over
       [teacher top-K | positive | sampled negatives] at every target position (search ones included)
       + kd.hidden_weight x hidden-state alignment (train/losses.py distill_loss)
    -> validation every epoch, early stopping, ckpt/best -> test once -> metrics.json (+ the teacher's test
       metrics and both models' parameter counts)

The run directory is a pretraining one (config.json = the student's PretrainConfig, ckpt/, metrics.json),
so `train export`, `train.init_from` and `train adapt` take it; distill.json records the whole config.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from torch import nn

from configs.load import ConfigError, load_config
from configs.schema import DistillConfig, KDConfig
from model.items import load_item_features
from model.seqrec import build_model
from train.losses import distill_loss
from train.pretrain import finish, fit, make_engine, open_run
from train.teacher import (
    OnlineTeacher,
    allowed_items,
    check_teacher_data,
    fingerprint,
    load_teacher,
    param_counts,
    teacher_run,
)
from train.teacher_labels import TeacherLabels, read_record


def distill_config(teacher: str | None, config: str | Path | None, overrides: list[str]) -> DistillConfig:
    """The teacher's shards, data, loss and eval sections and run_dir <teacher>_distill as defaults (the
    student learns the teacher's task on its data), then the YAML, then the --set overrides. The teacher is
    `teacher` (--teacher), else distill.teacher, else the one that wrote distill.labels."""
    first = load_config(DistillConfig, config, overrides)
    teacher = teacher or first.distill.teacher or (read_record(first.distill.labels)["teacher"]
                                                   if first.distill.labels else "")
    if not teacher:
        raise ConfigError("no teacher: pass --teacher runs/<name> (or set distill.teacher or distill.labels)")
    tcfg, _ = teacher_run(teacher)
    t = Path(teacher)
    start = DistillConfig(shards=tcfg.shards, run_dir=str(t.parent / f"{t.name}_distill"), data=tcfg.data,
                          loss=tcfg.loss, eval=tcfg.eval, distill=KDConfig(teacher=str(teacher)))
    cfg = load_config(DistillConfig, config, overrides, start=start)
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher=str(teacher)))


def check_kd(kd: KDConfig) -> None:
    if kd.top_k < 1:
        raise ConfigError(f"distill.top_k must be >= 1, got {kd.top_k}")
    if not kd.temperature > 0:
        raise ConfigError(f"distill.temperature must be > 0, got {kd.temperature}")
    weights = dict(task_weight=kd.task_weight, kd_weight=kd.kd_weight, hidden_weight=kd.hidden_weight)
    if min(weights.values()) < 0 or kd.task_weight + kd.kd_weight <= 0:
        raise ConfigError(f"distill weights must be >= 0 and task_weight + kd_weight > 0, got {weights}")


def teacher_source(run, tdir: Path, tcfg, tmetrics: dict):
    """(batch, real) -> TeacherTargets from online forwards of the frozen teacher or from its label files,
    and a description of the teacher for metrics.json."""
    cfg = run.cfg
    allowed = allowed_items(run.num_items, run.candidates, run.dev)
    about = dict(run=str(tdir), fingerprint=fingerprint(tdir), test=tmetrics.get("test"), model=dataclasses.asdict(
        tcfg.model), dim=tcfg.model.dim)
    if cfg.distill.labels:
        source = TeacherLabels(cfg.distill.labels, cfg, run.manifest, allowed, run.dev)
        return source, dict(about, params=source.record["teacher_params"], labels=str(cfg.distill.labels))
    model = load_teacher(tdir, run.dev)
    online = OnlineTeacher(model, cfg.distill.top_k, tcfg.loss.temperature, allowed)
    return online, dict(about, params=param_counts(model))


def main(cfg: DistillConfig) -> dict:
    # ---- setup: checks, process group, data, run directory; the teacher, frozen or as label files ---------
    check_kd(cfg.distill)
    tdir = Path(cfg.distill.teacher)
    tcfg, tmetrics = teacher_run(tdir)
    run = open_run(cfg)  # writes config.json: the student's PretrainConfig
    check_teacher_data(tdir, tcfg, tmetrics, run.manifest, cfg.data)
    teacher, about = teacher_source(run, tdir, tcfg, tmetrics)
    if run.rank == 0:
        (run.run_dir / "distill.json").write_text(json.dumps(dict(config=dataclasses.asdict(run.cfg), teacher=about),
                                                             indent=2, default=str) + "\n")

    # ---- student (+ the training-only projection to the teacher's width) and engine ------------------------
    student = build_model(cfg.model, run.manifest, cfg.data.max_len, load_item_features(cfg.shards, cfg.model))
    if cfg.distill.hidden_weight > 0:
        student.add_module("distill_align", nn.Linear(cfg.model.dim, about["dim"], bias=False))
    eng, state, guard = make_engine(student.to(run.dev), run)  # init_from, DeepSpeed, resume
    if run.rank == 0:
        s, t = param_counts(student), about["params"]
        print(f"distilling {tdir} ({t['non_embedding']:,} non-embedding + {t['embedding']:,} embedding parameters"
              f"{', from ' + str(cfg.distill.labels) if cfg.distill.labels else ', online'}) into a student of "
              f"{s['non_embedding']:,} + {s['embedding']:,}")

    # ---- loop: the pretraining loop with the distillation loss ---------------------------------------------
    def loss_fn(eng, batch, real: bool):
        return distill_loss(eng, batch, run.cfg.loss, cfg.distill, teacher(batch, real), run.num_items, run.gen,
                            run.candidates)

    train_seconds = fit(eng, run, state, guard, loss_fn)

    # ---- test once at the best validation epoch; metrics.json with the teacher's numbers beside ----------
    extra = dict(distill=dataclasses.asdict(cfg.distill), teacher=about, params=param_counts(student))
    metrics = finish(eng, run, state, train_seconds, extra)
    if run.rank == 0 and about["test"]:
        print(f"teacher test NDCG@10 {about['test']['ndcg@10']:.4f}, student {metrics['test']['ndcg@10']:.4f}")
    return metrics
