"""The study's job queue: what to run, in which order, which is done, and who runs it.

A job is done when its outputs are on disk (`is_done`), so the queue keeps no state of its own:
a killed study is resumed by running it again. Several workers (one process per GPU) share the
queue through claim files under runs/claims/:

- Claiming is atomic. The claim (pid, host, process start time, worker, time) is written to a
  private file and hard-linked to runs/claims/<job id>; the link fails when the name exists, as
  os.open(O_CREAT | O_EXCL) would, and no reader ever sees a half-written claim.
- A claim is stale when it was made on this host and its process is gone (pid not alive, or the
  pid now belongs to a process started at another time). Any worker may take a stale claim over;
  takeovers are serialised by an flock on runs/claims/.takeover so two workers never both take
  it. Claims from another host are never presumed stale: if that host died, delete the file.
- A failing job releases its claim and leaves runs/claims/failed/<job id>.txt (the traceback).
  Workers then skip it and the jobs that depend on it, and go on with everything else; the
  study clears the failure records when it starts (`clear_failures`), so a rerun retries them.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import paths
from .constants import BASE, EVAL, TEACHER, TRAIN, check_size

KINDS = ("generate", "train", "evaluate", "upload")


@dataclass(frozen=True)
class Job:
    """One unit of work. condition: an animal, 'neutral', or 'base' (evaluate only); seed: the
    student's seed, None for generate, base evaluation and the dataset's upload."""

    kind: str
    size: str
    condition: str
    seed: int | None = None

    @property
    def id(self) -> str:
        """Stable name, used for claim, failure and upload-marker files."""
        last = [f"seed{self.seed}"] if self.seed is not None else (["dataset"] if self.kind == "upload" else [])
        return "-".join([self.kind, self.size, self.condition, *last])

    @property
    def deps(self) -> tuple[Job, ...]:
        """Jobs whose outputs this one reads."""
        generate = Job("generate", self.size, self.condition)
        if self.kind == "train":
            return (generate,)
        if self.kind == "evaluate" and self.condition != BASE:
            return (Job("train", self.size, self.condition, self.seed),)
        if self.kind == "upload":
            if self.seed is None:
                return (generate,)
            # A student's model card reports its evaluation, so its upload waits for it too.
            return tuple(Job(kind, self.size, self.condition, self.seed) for kind in ("train", "evaluate"))
        return ()


def plan(sizes: Iterable[str], conditions: Iterable[str], seeds: Iterable[int]) -> list[Job]:
    """Every job of the grid, dependencies first. Per size: teacher data for each condition (the
    animals and neutral), the base evaluation, then the students seed by seed, each condition's
    student followed by its evaluation (so a run cut short has whole seeds evaluated, every
    condition of a seed together: at 0.5B one cohort), then uploads."""
    conditions, seeds = list(dict.fromkeys(conditions)), list(dict.fromkeys(seeds))
    jobs: list[Job] = []
    for size in dict.fromkeys(check_size(s) for s in sizes):
        students = [(c, k) for k in seeds for c in conditions]
        jobs += [Job("generate", size, c) for c in conditions]
        jobs.append(Job("evaluate", size, BASE))
        jobs += [Job(kind, size, c, k) for c, k in students for kind in ("train", "evaluate")]
        jobs += [Job("upload", size, c) for c in conditions]
        jobs += [Job("upload", size, c, k) for c, k in students]
    return jobs


def is_done(job: Job) -> bool:
    """Whether the job's outputs exist (every writer publishes them atomically, last)."""
    if job.kind == "generate":
        return paths.dataset_file(job.size, job.condition).exists()
    if job.kind == "train":
        return (paths.adapter_dir(job.size, job.condition, job.seed) / "adapter_model.safetensors").exists()
    if job.kind == "evaluate":
        condition = None if job.condition == BASE else job.condition
        return paths.eval_file(job.size, condition, job.seed).exists()
    return paths.upload_marker(job.id).exists()


def mark_uploaded(job: Job, info: dict) -> None:
    """Record a finished upload (what was pushed where): this marker is what makes it done."""
    _write_atomic(paths.upload_marker(job.id), json.dumps(info, indent=1))


# ---- claims -------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    now = _process_start(pid)
    return start is None or now is None or now == start


def _read_claim(job: Job) -> dict | None:
    try:
        return json.loads(paths.claim_file(job.id).read_text())
    except FileNotFoundError:
        return None


def _is_stale(claim: dict) -> bool:
    return claim["host"] == socket.gethostname() and not _alive(claim["pid"], claim.get("start"))


def claimed(job: Job) -> bool:
    """Whether a live worker holds the job."""
    claim = _read_claim(job)
    return claim is not None and not _is_stale(claim)


def try_claim(job: Job, worker_id: int | str) -> bool:
    """Claim the job for this process; False when another live worker holds it."""
    path = paths.claim_file(job.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record = {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid),
              "worker": worker_id, "time": time.time()}
    private = path.with_name(f".{path.name}.{pid}.tmp")
    private.write_text(json.dumps(record))
    try:
        for _ in range(2):  # a second try only after removing a stale claim
            try:
                os.link(private, path)
                return True
            except FileExistsError:
                if not _remove_if_stale(job):
                    return False
        return False
    finally:
        private.unlink()


def _remove_if_stale(job: Job) -> bool:
    """Delete the job's claim if its owner is gone; the flock makes check-and-delete one step."""
    path = paths.claim_file(job.id)
    with open(path.parent / ".takeover", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claim = _read_claim(job)
        if claim is None:
            return True
        if not _is_stale(claim):
            return False
        path.unlink()
        return True


def release(job: Job) -> None:
    paths.claim_file(job.id).unlink(missing_ok=True)


def failed(job: Job) -> bool:
    return paths.failure_file(job.id).exists()


def clear_failures() -> None:
    """Forget recorded failures so their jobs are tried again (the study calls this on start)."""
    for record in paths.failures_dir().glob("*.txt"):
        record.unlink(missing_ok=True)


# ---- workers ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_worker(jobs: list[Job], execute: Callable[[Job], None], worker_id: int | str, poll: float = 5.0,
               log: Callable[[str], None] = _log) -> dict[str, list[str]]:
    """Run jobs until none is left that this worker could run; return the ids it ran, those that
    failed (here or elsewhere) and those left blocked behind a failure or a missing dependency.

    Each round takes the first job in `jobs` order that is not done, not failed, has its
    dependencies done and can be claimed. When none can, but another worker holds a job that may
    unblock the rest, it sleeps `poll` seconds and looks again. A job that raises, or returns
    without its outputs, is recorded as failed and the worker goes on.
    """
    ran: list[str] = []
    while True:
        pending = [j for j in jobs if not is_done(j)]
        runnable = (j for j in pending if not failed(j) and all(map(is_done, j.deps)))
        job = next((j for j in runnable if try_claim(j, worker_id)), None)
        if job is None:
            if any(claimed(j) for j in pending):
                time.sleep(poll)
                continue
            return {"ran": ran, "failed": [j.id for j in pending if failed(j)],
                    "blocked": [j.id for j in pending if not failed(j)]}
        try:
            if is_done(job):  # finished by another worker between our look and our claim
                continue
            log(f"[worker {worker_id}] {time.strftime('%H:%M:%S')} {job.id}: start")
            began = time.monotonic()
            execute(job)
            if not is_done(job):  # would otherwise be picked again forever
                raise RuntimeError(f"{job.id} returned without writing its outputs")
            ran.append(job.id)
            log(f"[worker {worker_id}] {time.strftime('%H:%M:%S')} {job.id}: done in {time.monotonic() - began:.1f} s")
        except Exception as exc:
            _write_atomic(paths.failure_file(job.id),
                          f"worker {worker_id} pid {os.getpid()} on {socket.gethostname()} at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}")
            log(f"[worker {worker_id}] {job.id}: FAILED ({type(exc).__name__}: {exc}); going on with other jobs")
        finally:
            release(job)


def claim_more(first: Job, jobs: Iterable[Job], worker_id: int | str, limit: int,
               fits: Callable[[Job], bool] = lambda job: True) -> list[Job]:
    """Claim up to `limit - 1` more runnable jobs of `first`'s kind and size that `fits` accepts, to
    run together with it (a cohort of students); the caller releases them when done."""
    more: list[Job] = []
    for job in jobs:
        if len(more) >= limit - 1:
            break
        if (job != first and job.kind == first.kind and job.size == first.size and not is_done(job)
                and not failed(job) and all(map(is_done, job.deps)) and fits(job) and try_claim(job, worker_id)):
            if is_done(job):  # finished elsewhere between our look and our claim
                release(job)
                continue
            more.append(job)
    return more


def launch_workers(n_gpus: int, argv: list[str], per_gpu: int = 1) -> int:
    """Run `argv` `per_gpu` times per GPU, each process seeing only its GPU (CUDA_VISIBLE_DEVICES)
    and named in SUBLIMINAL_WORKER ('gpu{device}', or 'gpu{device}.{k}' when several share one),
    and wait for all; returns the worst exit code (largest in magnitude). Each process is expected
    to call `run_worker`. If this process already sees a subset of GPUs, the i-th GPU's workers get
    the i-th of them. Several workers per GPU fill the time one small model leaves it idle."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(n_gpus)]
    if n_gpus > len(devices):
        raise ValueError(f"{n_gpus} workers asked for but only {len(devices)} GPUs visible")
    procs = []
    for i in range(n_gpus * per_gpu):
        device = devices[i // per_gpu]
        name = f"gpu{device}" if per_gpu == 1 else f"gpu{device}.{i % per_gpu}"
        procs.append(subprocess.Popen(argv, env={**os.environ, "CUDA_VISIBLE_DEVICES": device,
                                                 "SUBLIMINAL_WORKER": name}))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # let each worker release its claim and stop
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    return max(codes, key=abs)


# ---- GPU-hour estimate ---------------------------------------------------------------------------

# Reference tokens/s on one H100 80GB, bf16, from ../shared/reference/anchors.md. ESTIMATES ONLY:
# they were measured on the reference stacks (TRL SFTTrainer + PEFT LoRA at effective batch 60;
# transformers `generate`, T=1, batch 256), not on ours. Measured numbers in runs/throughput.json
# (see `record_throughput`) replace them.
REFERENCE_THROUGHPUT: dict[str, dict[str, float]] = {
    "train": {"0.5b": 38_100, "1.5b": 22_200, "3b": 11_500, "7b": 6_200, "14b": 2_700, "32b": 1_200},
    "generate": {"0.5b": 2_800, "1.5b": 2_600, "3b": 2_500, "7b": 3_600, "14b": 2_100, "32b": 1_800},
}
TOKENS_PER_PAIR = 145  # prompt + completion of one numbers pair, Qwen2.5 tokenizer (anchors.md)
GENERATED_TOKENS_PER_PROMPT = 45  # a teacher completion: up to 10 numbers of 3 digits, digit by digit
ANSWER_TOKENS = 6  # a one-word answer and its end token, mostly (EVAL.max_new_tokens caps it)


def load_throughput() -> tuple[dict[str, dict[str, float]], set[str]]:
    """Tokens/s per phase ('train', 'generate') and size: the reference estimates overridden by
    runs/throughput.json; also the 'phase/size' keys that are measured."""
    rates = {phase: dict(table) for phase, table in REFERENCE_THROUGHPUT.items()}
    measured: set[str] = set()
    path = paths.throughput_file()
    if path.exists():
        for phase, table in json.loads(path.read_text()).items():
            for size, value in table.items():
                rates.setdefault(phase, {})[size] = float(value)
                measured.add(f"{phase}/{size}")
    return rates, measured


def record_throughput(phase: str, size: str, tokens_per_s: float) -> None:
    """Store a measured rate in runs/throughput.json for later estimates."""
    path = paths.throughput_file()
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(phase, {})[size] = tokens_per_s
    _write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def estimate_hours(jobs: Iterable[Job], throughput: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """GPU-hours per job kind and in total (uploads count as none); `throughput` defaults to
    `load_throughput()`. Pass only the jobs not yet done for the time left."""
    rates = throughput if throughput is not None else load_throughput()[0]
    tokens = {"generate": TEACHER.prompts * GENERATED_TOKENS_PER_PROMPT,
              "train": TRAIN.pairs * TRAIN.epochs * TOKENS_PER_PAIR,
              "evaluate": EVAL.questions * EVAL.samples * ANSWER_TOKENS}
    phase = {"generate": "generate", "train": "train", "evaluate": "generate"}
    hours = dict.fromkeys(KINDS, 0.0)
    for job in jobs:
        if job.kind in tokens:
            hours[job.kind] += tokens[job.kind] / rates[phase[job.kind]][job.size] / 3600
    hours["total"] = sum(hours.values())
    return hours


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
