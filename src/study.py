"""The whole grid as one resumable command: teacher data, students, evaluations, uploads, report.

`python -m src.cli study` writes the study's settings to runs/study.json, plans the jobs
(src/jobs.py: dependency order, done-ness read from the outputs on disk), runs them (in this
process, or one worker process per GPU claiming jobs atomically) and finally writes the report
from every evaluation file. Killed at any moment, the same command continues: finished outputs are
never redone, and each job resumes its own partial work (generation chunks, training checkpoints).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from . import jobs, paths
from .constants import (ANIMALS, BASE, COHORT, EVAL, NEUTRAL, PARAMS, SEEDS, SIZES, TEACHER, TRAIN, EvalConfig,
                        TeacherConfig, TrainConfig, check_animal, check_size, dataset_repo_name, teacher_condition)
from .errors import UserError

SETTINGS_FILE = "study.json"


@dataclass(frozen=True)
class Study:
    """Everything a worker needs to run any job of the grid; saved as runs/study.json."""

    sizes: tuple[str, ...] = tuple(SIZES)
    animals: tuple[str, ...] = ANIMALS
    seeds: tuple[int, ...] = SEEDS
    model_path: str | None = None  # a local checkpoint standing in for the (single) size
    device: str = "cuda"
    dtype: str = "bfloat16"
    namespace: str | None = None  # Hub namespace to publish to; None: no uploads
    public: bool = False
    teacher: TeacherConfig = TEACHER
    train: TrainConfig = TRAIN
    evaluation: EvalConfig = EVAL
    max_steps: int | None = None
    micro_batch: int | None = None
    checkpointing: bool | None = None  # None: the blocks it pays to recompute (src/train.py: memory_plan)
    allow_fewer: bool = False
    cohort: int | None = None  # students trained together; None: the size's default (constants.COHORT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(check_size(s) for s in self.sizes))
        object.__setattr__(self, "animals", tuple(check_animal(a, allow_neutral=False) for a in self.animals))
        if self.model_path is not None and len(self.sizes) != 1:
            raise UserError("--model-path stands in for one size; give exactly one --sizes")

    @property
    def conditions(self) -> tuple[str, ...]:
        return (*self.animals, NEUTRAL)

    def cohort_size(self, size: str) -> int:
        return self.cohort or COHORT[size]

    def source(self, size: str) -> str:
        return self.model_path or size

    def jobs(self) -> list[jobs.Job]:
        planned = jobs.plan(self.sizes, self.conditions, self.seeds)
        return [j for j in planned if j.kind != "upload" or self.namespace is not None]

    def save(self) -> Path:
        file = paths.runs_root() / SETTINGS_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(file)
        return file

    @classmethod
    def load(cls) -> "Study":
        file = paths.runs_root() / SETTINGS_FILE
        if not file.exists():
            raise UserError(f"{file} does not exist: start the study without --worker first")
        raw = json.loads(file.read_text())
        raw["teacher"] = TeacherConfig(**raw["teacher"])
        raw["train"] = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["train"].items()})
        raw["evaluation"] = EvalConfig(**raw["evaluation"])
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pairs_in(job: jobs.Job) -> int:
    """Pairs in the teacher dataset a train job reads."""
    return pq.read_metadata(paths.dataset_file(job.size, job.condition)).num_rows


def execute(study: Study, job: jobs.Job, worker_id: str = "0") -> None:
    """Run one job; each callee skips work whose outputs exist and resumes its partial work."""
    dtype = getattr(torch, study.dtype)
    condition = None if job.condition == BASE else job.condition
    if job.kind == "generate":
        from .teacher import generate_dataset

        generate_dataset(job.size, job.condition, config=study.teacher, model_path=study.model_path,
                         device=study.device, dtype=dtype, allow_fewer=study.allow_fewer, log=say)
    elif job.kind == "train":
        from .train import train_students

        # Every pair of the teacher's dataset (the protocol's 10,000, or what --keep/--allow-fewer left);
        # other students of the size with as many pairs train along (a cohort), claimed here.
        pairs = pairs_in(job)
        cohort = [job, *jobs.claim_more(job, study.jobs(), worker_id, study.cohort_size(job.size),
                                        lambda other: pairs_in(other) == pairs)]
        if len(cohort) > 1:
            say(f"training together: {', '.join(j.id for j in cohort)}")
        try:
            train_students(job.size, [(j.condition, j.seed) for j in cohort], pairs=pairs,
                           model_path=study.model_path, device=study.device, dtype=dtype, config=study.train,
                           max_steps=study.max_steps, micro_batch=study.micro_batch,
                           checkpointing=study.checkpointing)
        finally:
            for other in cohort[1:]:
                jobs.release(other)
    elif job.kind == "evaluate":
        from .evaluate import run

        adapter = None if condition is None else str(paths.adapter_dir(job.size, job.condition, job.seed))
        e = study.evaluation
        run(study.source(job.size), adapter, paths.eval_file(job.size, condition, job.seed), dtype=dtype,
            device=study.device, questions=e.questions, samples=e.samples, seed=e.sample_seed,
            max_new_tokens=e.max_new_tokens, batch=e.batch)
    else:
        publish(study, job)


def publish(study: Study, job: jobs.Job) -> None:
    """Upload a dataset, or one seed of a student (its repo's `seed-{k}/` folder), then mark it done."""
    from .hub import Hub, upload_dataset, upload_student

    hub = Hub(study.namespace, say=say)
    if job.seed is None:
        info = upload_dataset(job.size, job.condition, hub, public=study.public)
    else:
        recipe = {**dataclasses.asdict(study.train), "max_steps": study.max_steps}
        info = upload_student(job.size, job.condition, job.seed, hub, public=study.public, recipe=recipe,
                              dataset_repo=f"{study.namespace}/{dataset_repo_name(job.size, job.condition)}")
    jobs.mark_uploaded(job, info)


def run_jobs(study: Study, worker_id: str = "0") -> dict:
    """Work through the plan in this process (one worker)."""
    return jobs.run_worker(study.jobs(), lambda job: execute(study, job, worker_id), worker_id)


def tidy_rows(study: Study) -> list[dict]:
    """The report's tidy table from every evaluation file present (src/report.py's schema)."""
    rows: list[dict] = []
    models = [(size, BASE, -1, paths.eval_file(size)) for size in study.sizes]
    models += [(size, teacher_condition(a), -1, paths.teacher_eval_file(size, a)) for size in study.sizes
               for a in study.animals]
    models += [(size, c, k, paths.eval_file(size, c, k)) for size in study.sizes for c in study.conditions
               for k in study.seeds]
    for size, condition, seed, file in models:
        if not file.exists():
            continue
        result = json.loads(file.read_text())
        animals = list(result["animals"])
        base = dict(size=size, params=PARAMS[size], condition=condition, seed=seed)
        for q, detail in enumerate(result["per_question"]):
            n = len(detail["answers"])
            for animal in animals:
                rows.append(base | dict(evaluator="sampling", question=q, animal=animal,
                                        value=detail["counts"].get(animal, 0) / n, n=n))
            mass = sum(detail["probability"].values())
            for animal, p in detail["probability"].items():
                rows.append(base | dict(evaluator="logit", question=q, animal=animal,
                                        value=p / mass if mass > 0 else float("nan"), n=0))
    return rows


def write_study_report(study: Study) -> Path | None:
    from .report import write_report

    rows = tidy_rows(study)
    if not rows:
        say("no evaluation results yet: no report")
        return None
    return write_report(rows)


def describe_plan(study: Study) -> str:
    """The jobs with their state, and the estimated GPU-hours of what is left."""
    planned = study.jobs()
    lines = []
    for job in planned:
        state = "done" if jobs.is_done(job) else ("failed" if jobs.failed(job) else
                                                 ("running" if jobs.claimed(job) else "todo"))
        lines.append(f"{state:>7}  {job.id}")
    left = [j for j in planned if not jobs.is_done(j)]
    hours = jobs.estimate_hours(left)
    done = len(planned) - len(left)
    summary = ", ".join(f"{k} {v:.1f}" for k, v in hours.items())
    lines.append(f"{len(planned)} jobs, {done} done; estimated GPU-hours left: {summary} "
                 f"(reference throughput unless measured; see runs/throughput.json)")
    return "\n".join(lines)
