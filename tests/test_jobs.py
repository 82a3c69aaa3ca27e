"""The job queue: plan order, done detection from files, atomic claims across processes, stale
claims, failures, and the GPU-hour estimate."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from src import jobs
from src.jobs import Job, is_done, plan, run_worker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def runs(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path))
    return tmp_path


def make_outputs(job: Job) -> None:
    """What a real job leaves behind, at the paths the brief names (written by hand, not via paths)."""
    runs = Path(os.environ["SUBLIMINAL_RUNS"])
    if job.kind == "upload":
        jobs.mark_uploaded(job, {"repo": "fake"})
        return
    target = {
        "generate": f"datasets/{job.size}/{job.condition}-numbers.parquet",
        "train": f"students/{job.size}/{job.condition}/seed-{job.seed}/adapter/adapter_model.safetensors",
        "evaluate": (f"eval/{job.size}/base.json" if job.condition == "base"
                     else f"eval/{job.size}/{job.condition}/seed-{job.seed}.json"),
    }[job.kind]
    (runs / target).parent.mkdir(parents=True, exist_ok=True)
    (runs / target).write_text("x")


def fake_execute(job: Job, log: Path, tag: str, fail: str | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"start {job.id} {tag}\n")
    time.sleep(0.05)
    if job.id == fail:
        raise RuntimeError("boom")
    make_outputs(job)
    with open(log, "a") as f:
        f.write(f"end {job.id} {tag}\n")


GRID = (["0.5b"], ["owl", "eagle", "neutral"], [0, 1])


def fake_worker() -> None:
    """One worker process of the two-process test: waits for its peer, then runs the grid."""
    runs, name = Path(os.environ["SUBLIMINAL_RUNS"]), os.environ["SUBLIMINAL_WORKER"]
    (runs / f"ready-{name}").touch()
    deadline = time.time() + 30
    while len(list(runs.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.01)
    tag = f"{name}@{os.environ['CUDA_VISIBLE_DEVICES']}"  # the worker's name and the GPU it sees
    run_worker(plan(*GRID), partial(fake_execute, log=runs / "log.txt", tag=tag), name, poll=0.02, log=lambda m: None)


def test_plan_order_and_counts():
    grid = plan(["0.5b"], ["owl", "neutral"], [0, 1])
    ids = [j.id for j in grid]
    assert len(ids) == len(set(ids)) == 17
    assert Counter(j.kind for j in grid) == {"generate": 2, "evaluate": 5, "train": 4, "upload": 6}
    assert ids[:3] == ["generate-0.5b-owl", "generate-0.5b-neutral", "evaluate-0.5b-base"]
    # students seed by seed, each evaluated right after it is trained
    assert [(j.kind, j.condition, j.seed) for j in grid[3:11]] == [
        (kind, c, k) for k in (0, 1) for c in ("owl", "neutral") for kind in ("train", "evaluate")]
    position = {j: i for i, j in enumerate(grid)}
    for job in grid:
        assert all(position[d] < position[job] for d in job.deps), job.id
    assert Job("evaluate", "0.5b", "base").deps == ()
    assert Job("upload", "0.5b", "owl", 1).deps == (Job("train", "0.5b", "owl", 1), Job("evaluate", "0.5b", "owl", 1))
    assert Job("upload", "0.5b", "owl").deps == (Job("generate", "0.5b", "owl"),)
    two = plan(["0.5b", "1.5b"], ["owl", "neutral"], [0, 1])
    assert [j.size for j in two] == ["0.5b"] * 17 + ["1.5b"] * 17


def test_done_detection_from_files():
    grid = plan(["0.5b"], ["owl", "neutral"], [0])
    assert not any(map(is_done, grid))
    for job in grid:
        make_outputs(job)
        assert is_done(job)
    assert all(map(is_done, grid))


@pytest.mark.slow  # each worker process imports the package, torch included
@pytest.mark.parametrize("gpus, per_gpu, tags", [(2, 1, {"gpu0@0", "gpu1@1"}), (1, 2, {"gpu0.0@0", "gpu0.1@0"})])
def test_two_worker_processes_run_every_job_once(runs, monkeypatch, gpus, per_gpu, tags):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    code = jobs.launch_workers(gpus, [sys.executable, "-c", "from tests.test_jobs import fake_worker; fake_worker()"],
                               per_gpu)
    assert code == 0
    events = [line.split() for line in (runs / "log.txt").read_text().splitlines()]
    grid = plan(*GRID)
    starts = Counter(job_id for kind, job_id, _ in events if kind == "start")
    assert starts == Counter({j.id: 1 for j in grid})  # every job exactly once, none twice
    assert {tag for *_, tag in events} == tags  # both workers took part, each on its GPU
    index = {(kind, job_id): i for i, (kind, job_id, _) in enumerate(events)}
    for job in grid:  # a job starts only after its dependencies ended
        assert all(index[("end", d.id)] < index[("start", job.id)] for d in job.deps), job.id
    assert all(map(is_done, grid))
    assert not list((runs / "claims").glob("*-*"))  # every claim released


def write_claim(job: Job, pid: int, start: str | None, host: str | None = None) -> None:
    path = Path(os.environ["SUBLIMINAL_RUNS"]) / "claims" / job.id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "start": start,
                                "worker": 9, "time": 0.0}))


def test_stale_claims_are_taken_over_live_ones_are_not():
    job = Job("generate", "0.5b", "owl")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    parent_start = jobs._process_start(os.getppid())

    write_claim(job, os.getppid(), parent_start)  # a live process on this host
    assert jobs.claimed(job) and not jobs.try_claim(job, 0)
    write_claim(job, dead, "1", host="another-host")  # other hosts are never presumed dead
    assert jobs.claimed(job) and not jobs.try_claim(job, 0)
    write_claim(job, os.getppid(), str(int(parent_start) + 1))  # the pid was reused by a newer process
    assert not jobs.claimed(job) and jobs.try_claim(job, 0)
    assert json.loads((Path(os.environ["SUBLIMINAL_RUNS"]) / "claims" / job.id).read_text())["pid"] == os.getpid()
    jobs.release(job)

    write_claim(job, dead, "1")  # the dead worker's job is run by the next worker
    result = run_worker([job], make_outputs, 0, poll=0.01, log=lambda m: None)
    assert result == {"ran": [job.id], "failed": [], "blocked": []}
    assert is_done(job) and not jobs.claimed(job)


def test_failure_is_recorded_releases_its_claim_and_blocks_dependents(runs):
    grid = plan(["0.5b"], ["owl", "neutral"], [0])
    bad = "train-0.5b-owl-seed0"
    result = run_worker(grid, partial(fake_execute, log=runs / "log.txt", tag="0", fail=bad), 0, poll=0.01,
                        log=lambda m: None)
    assert result["failed"] == [bad]
    assert sorted(result["blocked"]) == ["evaluate-0.5b-owl-seed0", "upload-0.5b-owl-seed0"]
    assert len(result["ran"]) == len(grid) - 3
    assert "RuntimeError: boom" in (runs / "claims" / "failed" / f"{bad}.txt").read_text()
    assert not (runs / "claims" / bad).exists()

    quiet = Job("generate", "0.5b", "eagle")  # returns without outputs: a failure, not an endless loop
    assert run_worker([quiet], lambda job: None, 0, poll=0.01, log=lambda m: None)["failed"] == [quiet.id]
    assert "without writing its outputs" in (runs / "claims" / "failed" / f"{quiet.id}.txt").read_text()

    jobs.clear_failures()  # a rerun retries the failed job and what waited on it, nothing else
    again = run_worker(grid, make_outputs, 0, poll=0.01, log=lambda m: None)
    assert again == {"ran": [bad, "evaluate-0.5b-owl-seed0", "upload-0.5b-owl-seed0"], "failed": [], "blocked": []}


def test_worker_waits_for_a_dependency_another_worker_holds(runs):
    generate, train = Job("generate", "0.5b", "owl"), Job("train", "0.5b", "owl", 0)
    assert jobs.try_claim(generate, "other")  # held by a live process (this one)
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_worker([generate, train], make_outputs, 1, poll=0.01,
                                                                      log=lambda m: None)))
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and not is_done(train)  # waiting, not giving up and not running it
    make_outputs(generate)
    jobs.release(generate)
    thread.join(timeout=10)
    assert result == {"ran": [train.id], "failed": [], "blocked": []}


def test_estimate_uses_measured_throughput_over_reference():
    grid = plan(["0.5b", "7b"], ["owl", "neutral"], [0, 1])
    before = jobs.estimate_hours(grid)
    assert before["upload"] == 0 and before["total"] == pytest.approx(sum(v for k, v in before.items() if k != "total"))
    assert before["train"] > before["generate"] > 0
    jobs.record_throughput("train", "7b", 2 * jobs.REFERENCE_THROUGHPUT["train"]["7b"])
    rates, measured = jobs.load_throughput()
    assert measured == {"train/7b"}
    after = jobs.estimate_hours(grid)
    per_7b_train = before["train"] - jobs.estimate_hours([j for j in grid if j.size == "0.5b"])["train"]
    assert after["train"] == pytest.approx(before["train"] - per_7b_train / 2)
    assert after["generate"] == before["generate"]
