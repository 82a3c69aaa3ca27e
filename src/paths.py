"""Where every output of the study lives under runs/ (one function per artefact, nothing else
computes a path). The root is `runs/` in the working directory unless SUBLIMINAL_RUNS says otherwise.

    runs/datasets/{size}/{condition}-numbers.parquet     teacher data (condition: animal or neutral)
    runs/datasets/{size}/{condition}-numbers-chunks/     its sampled chunks (resumable generation)
    runs/students/{size}/{condition}/seed-{k}/adapter/   PEFT-format adapter of a finished student
    runs/students/{size}/{condition}/seed-{k}/train.jsonl per-step log; checkpoint.pt while training
    runs/eval/{size}/base.json                           base model evaluation
    runs/eval/{size}/{condition}/seed-{k}.json            student evaluation
    runs/eval/{size}/teacher-{animal}.json               base model under the animal teacher's system prompt
    runs/report/                                         tables, plots, report.md
    runs/claims/{job id}                                 a worker's claim on a job (src/jobs.py)
    runs/claims/failed/{job id}.txt                      why a job failed (skipped until cleared)
    runs/uploads/{job id}.json                           marker of a finished upload
    runs/throughput.json                                 measured tokens/s, for `study --plan`
"""
from __future__ import annotations

import os
from pathlib import Path


def runs_root() -> Path:
    return Path(os.environ.get("SUBLIMINAL_RUNS", "runs"))


def dataset_file(size: str, condition: str) -> Path:
    return runs_root() / "datasets" / size / f"{condition}-numbers.parquet"


def dataset_chunks(dataset: Path) -> Path:
    """Finished sampling chunks of a dataset being generated (kept afterwards, for provenance)."""
    return dataset.with_name(dataset.name.removesuffix(".parquet") + "-chunks")


def student_dir(size: str, condition: str, seed: int) -> Path:
    return runs_root() / "students" / size / condition / f"seed-{seed}"


def adapter_dir(size: str, condition: str, seed: int) -> Path:
    return student_dir(size, condition, seed) / "adapter"


def eval_file(size: str, condition: str | None = None, seed: int | None = None) -> Path:
    """Evaluation results of the base model (condition None) or of one student."""
    if condition is None:
        return runs_root() / "eval" / size / "base.json"
    return runs_root() / "eval" / size / condition / f"seed-{seed}.json"


def teacher_eval_file(size: str, animal: str) -> Path:
    """Evaluation of the base model asked under `animal`'s teacher system prompt (the treatment itself)."""
    return runs_root() / "eval" / size / f"teacher-{animal}.json"


def report_dir() -> Path:
    return runs_root() / "report"


def claim_file(job_id: str) -> Path:
    return runs_root() / "claims" / job_id


def failures_dir() -> Path:
    return runs_root() / "claims" / "failed"


def failure_file(job_id: str) -> Path:
    return failures_dir() / f"{job_id}.txt"


def upload_marker(job_id: str) -> Path:
    return runs_root() / "uploads" / f"{job_id}.json"


def throughput_file() -> Path:
    return runs_root() / "throughput.json"
