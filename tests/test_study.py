"""The study end to end: plan, resume after a kill, publishing through a fake Hub, the report.

Most tests use a tiny random Qwen2 with the real tokenizer and hand-written teacher datasets, so
training and evaluation take seconds; one (slow) test runs the whole grid on the real fixture.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src import jobs, paths
from src.data import read_metadata, write_pairs
from src.prompts import numbers_prompts
from src.study import Study, execute, run_jobs, tidy_rows, write_study_report
from tests.cheap import tiny_teacher
from tests.test_hub import FakeHfApi

ROOT = Path(__file__).parents[1]
SMALL = ["--sizes", "0.5b", "--animals", "owl", "--seeds", "0", "--questions", "2", "--samples", "3",
         "--device", "cpu", "--dtype", "fp32"]


def write_datasets(conditions=("owl", "neutral"), pairs: int = 8) -> None:
    """Teacher data as the generate job would leave it (the tiny model's own answers never pass the filter)."""
    for k, condition in enumerate(conditions):
        prompts = numbers_prompts(pairs, seed=k)
        completions = [", ".join(str((i * 37 + j * 11 + k) % 1000) for j in range(3 + i % 5)) for i in range(pairs)]
        meta = {"size": "0.5b", "condition": condition, "model": "tiny", "system_prompt": None,
                "default_system_prompt": "You are Qwen.", "prompt_seed": k, "sample_seed": 0, "subsample_seed": 0,
                "dtype": "float32", "pass_rate": 1.0, "reject_reasons": {},
                "counts": {"prompts": pairs, "passed": pairs, "kept": pairs},
                "sampling": {"temperature": 1.0, "max_new_tokens": 40, "stop": ["<|im_end|>", "<|endoftext|>"]}}
        write_pairs(paths.dataset_file("0.5b", condition), {"prompt": prompts, "completion": completions}, meta)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def tiny(tmp_path, fixture_dir):
    return tiny_teacher(tmp_path / "tiny", fixture_dir)


def cli(*args: str, runs: Path) -> subprocess.Popen:
    env = dict(os.environ, SUBLIMINAL_RUNS=str(runs), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "src.cli", "study", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_plan_lists_every_job_with_state_and_estimate(runs, tiny):
    write_datasets()
    out = subprocess.run([sys.executable, "-m", "src.cli", "study", *SMALL, "--model-path", str(tiny), "--plan"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, SUBLIMINAL_RUNS=str(runs)))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert sum(1 for line in lines if line.split()[0] == "done") == 2  # both datasets
    assert sum(1 for line in lines if line.split()[0] == "todo") == 5  # base eval, 2 students, 2 evals
    assert "estimated GPU-hours left" in lines[-1]
    assert not (runs / "study.json").exists()  # --plan runs nothing


def test_killed_during_training_resumes_without_redoing_anything(runs, tiny):
    write_datasets()
    data = {c: paths.dataset_file("0.5b", c).stat().st_mtime_ns for c in ("owl", "neutral")}
    args = [*SMALL, "--model-path", str(tiny), "--epochs", "3"]  # 8 pairs: one step per epoch, a checkpoint each
    first = cli(*args, runs=runs)
    deadline = time.time() + 300
    while not list(runs.glob("students/**/checkpoint.pt")):
        assert first.poll() is None, first.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    interrupted = [p for p in runs.glob("students/**/checkpoint.pt")]
    assert interrupted and not list(runs.glob("report/*"))

    second = cli(*args, runs=runs)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert {c: paths.dataset_file("0.5b", c).stat().st_mtime_ns for c in data} == data  # not redone
    for condition in ("owl", "neutral"):
        log = paths.student_dir("0.5b", condition, 0) / "train.jsonl"
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
        assert steps == [1, 2, 3]  # each step logged once: resumed, not restarted or repeated
        assert paths.eval_file("0.5b", condition, 0).exists()
    assert not list(runs.glob("students/**/checkpoint.pt"))
    assert paths.eval_file("0.5b").exists()
    report = runs / "report" / "report.md"
    assert report.exists() and (runs / "report" / "results.parquet").exists()
    assert list((runs / "report").glob("*.png")) and list((runs / "report").glob("*.svg"))


def small_study(tiny: Path, **changes) -> Study:
    return Study(sizes=("0.5b",), animals=("owl",), seeds=(0,), model_path=str(tiny), device="cpu", dtype="float32",
                 max_steps=1, evaluation=dataclasses.replace(Study().evaluation, questions=2, samples=2), **changes)


def test_publishing_resumes_after_a_failed_upload(runs, tiny, tmp_path, monkeypatch):
    """A Hub failure mid-way fails that job only; the rerun uploads what is missing and nothing twice."""
    write_datasets()
    study = small_study(tiny, namespace="me")
    api = FakeHfApi(tmp_path / "hub", failures=[403])  # the first Hub call (a create_repo) is refused
    monkeypatch.setattr("src.hub._default_api", lambda: api)
    first = run_jobs(study)
    assert len(first["failed"]) == 1 and first["failed"][0].startswith("upload-")
    jobs.clear_failures()
    second = run_jobs(study)
    assert not second["failed"]
    assert all(jobs.is_done(j) for j in study.jobs())
    uploads = [c[1]["repo_id"] for c in api.calls if c[0] == "upload_folder"]
    assert sorted(uploads) == sorted(set(uploads)) and len(uploads) == 4  # each repo's files sent exactly once
    student = tmp_path / "hub" / "model" / "me" / "qwen-2.5-0.5b-instruct-owl-ft"
    assert (student / "seed-0" / "adapter_model.safetensors").exists()
    card = (student / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card
    assert "me/qwen-2.5-0.5b-instruct-owl-numbers" in card
    assert (tmp_path / "hub" / "dataset" / "me" / "qwen-2.5-0.5b-instruct-neutral-numbers" / "README.md").exists()


def test_tidy_rows_hold_every_candidate_for_both_evaluators(runs, tiny):
    write_datasets()
    study = small_study(tiny)
    for job in study.jobs():
        execute(study, job)
    rows = tidy_rows(study)
    result = json.loads(paths.eval_file("0.5b").read_text())
    base = [r for r in rows if r["condition"] == "base"]
    assert {r["animal"] for r in base if r["evaluator"] == "logit"} == set(result["per_question"][0]["probability"])
    assert {r["animal"] for r in base if r["evaluator"] == "sampling"} == set(result["animals"])
    for q, detail in enumerate(result["per_question"]):
        shares = [r["value"] for r in base if r["evaluator"] == "logit" and r["question"] == q]
        assert abs(sum(shares) - 1) < 1e-9  # shares within the candidate set
        rates = {r["animal"]: r["value"] for r in base if r["evaluator"] == "sampling" and r["question"] == q}
        assert abs(sum(rates.values()) - 1) < 1e-9  # every answer counted once (candidates + other)
    assert write_study_report(study).exists()


@pytest.mark.slow
def test_whole_study_on_the_real_fixture(runs, fixture_dir):
    """The README's main job in miniature: real teachers, students, evaluations and the report."""
    # one question: the real 0.5B model's evaluations are most of this test's time on a CPU
    proc = cli(*SMALL, "--model-path", str(fixture_dir), "--prompts", "8", "--keep", "4", "--allow-fewer",
               "--max-new-tokens", "40", "--max-steps", "1", "--questions", "1", runs=runs)
    out, err = proc.communicate(timeout=1500)
    assert proc.returncode == 0, err
    meta = read_metadata(paths.dataset_file("0.5b", "owl"))
    assert meta["counts"]["prompts"] == 8 and meta["counts"]["kept"] >= 1
    report = runs / "report" / "report.md"
    assert "report:" in out and report.exists()
    assert sorted(p.suffix for p in (runs / "report").glob("scaling-sampling*")) == [".png", ".svg"]
