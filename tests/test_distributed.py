"""Data-parallel training over two processes (gloo, CPU) against one process.

- `torchrun --nproc-per-node 2 -m src.cli train` in float32 against the same command in one process:
  the same per-step losses, learning rates, gradient norms and token counts (so every step still
  covers the whole effective batch, here 8 for CPU time; the short last step of an epoch leaves one
  rank empty), nearly the same adapter, one log and one adapter written, one report printed;
- the loop in float64 over two spawned processes, killed after a checkpoint and resumed over two
  processes: the single-process losses and adapter up to float64 summation order (exactness)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner
from safetensors.torch import load_file

from src import load_model
from src.cli import main
from src.constants import TRAIN
from src.data import write_pairs
from src.train import train
from tests.cheap import one_thread, tiny_teacher  # noqa: F401 (a fixture)
from tests.test_train import number_pairs, random_token_pairs, relative

BATCH = 8  # the effective batch (the protocol's 60 costs CPU time and changes nothing here)
PAIRS = 2 * BATCH + 1  # steps of 8, 8 and 1 example per epoch
LOSS_TOLERANCE = 1e-5  # relative, float32
ADAPTER_TOLERANCE = 3e-4  # relative norm of the difference per tensor: Adam's g/sqrt(v) amplifies rounding


@pytest.fixture
def student_args(tmp_path, fixture_dir):
    """The `train` arguments but --out: a tiny random model with the real tokenizer, PAIRS numbers pairs."""
    model = tiny_teacher(tmp_path / "model", fixture_dir)
    pairs = number_pairs(PAIRS, seed=5)
    data = write_pairs(tmp_path / "pairs.parquet",
                       {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    return ["--size", "0.5b", "--data", str(data), "--model-path", str(model), "--device", "cpu", "--dtype", "fp32",
            "--seed", "3", "--epochs", "2", "--lr", "1e-2", "--batch-size", str(BATCH), "--checkpoint-every", "2"]


def one_process(args: list[str]):
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output
    return result


def two_processes(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "src.cli", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]


def read_adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


def outputs(out: Path) -> tuple[list[dict], dict]:
    """The log and adapter tensors of a `train --out OUT` run."""
    return read_log(out.with_name(f"{out.name}-training")), read_adapter(out)


def assert_same_training(log: list[dict], adapter: dict, ref_log: list[dict], ref_adapter: dict) -> None:
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(1, 7))
    for r, ref in zip(log, ref_log):
        assert r["lr"] == ref["lr"] and r["tokens"] == ref["tokens"] and r["epoch"] == ref["epoch"]
        assert abs(r["loss"] - ref["loss"]) <= LOSS_TOLERANCE * ref["loss"], (r, ref)
        assert abs(r["grad_norm"] - ref["grad_norm"]) <= LOSS_TOLERANCE * ref["grad_norm"], (r, ref)
    assert ref_log[-1]["loss"] < ref_log[0]["loss"] - 0.1  # it learns: not two idle runs compared
    assert set(adapter) == set(ref_adapter)
    for key in ref_adapter:
        assert relative(adapter[key], ref_adapter[key]) <= ADAPTER_TOLERANCE, key
    print("float32: max relative loss difference",
          max(abs(r["loss"] - ref["loss"]) / ref["loss"] for r, ref in zip(log, ref_log)),
          "max relative adapter difference", max(relative(adapter[k], ref_adapter[k]) for k in ref_adapter))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as each rank, and far faster on a busy machine
def test_two_processes_train_as_one(student_args, tmp_path):
    one_process([*student_args, "--out", str(tmp_path / "one/adapter")])
    result = two_processes([*student_args, "--out", str(tmp_path / "two/adapter"), "--micro-batch", "3"])
    assert result.stdout.count("adapter written") == 1  # rank 0 alone reports
    assert_same_training(*outputs(tmp_path / "two/adapter"), *outputs(tmp_path / "one/adapter"))
    # one log and one adapter, no checkpoint or temporary file left
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter", "adapter-training"]
    assert sorted(p.name for p in (tmp_path / "two/adapter-training").iterdir()) == ["train.jsonl"]
    assert (sorted(p.name for p in (tmp_path / "two/adapter").iterdir())
            == sorted(p.name for p in (tmp_path / "one/adapter").iterdir()))


class Stop(Exception):
    pass


def stop_at_step_5(record: dict) -> None:
    if record["step"] == 5:  # the last checkpoint holds step 4; step 5 is in the log and is redone
        raise Stop


def train_float64(work: Path, folder: Path, on_step=None) -> None:
    config = dataclasses.replace(TRAIN, batch_size=BATCH, epochs=2, lr=1e-2)
    train(load_model(folder, dtype=torch.float64), random_token_pairs(PAIRS, seed=1), work / "adapter", work, seed=3,
          config=config, micro_batch=3, checkpoint_every=2, on_step=on_step)


def rank_process(rank: int, rendezvous: Path, work: Path, folder: Path, stop: bool) -> None:
    """One of two ranks (torch.multiprocessing.spawn), in a gloo group met through a file."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    train_float64(work, folder, stop_at_step_5 if stop else None)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_killed_and_resumed_over_two_processes_is_exact(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint(seed=4)
    train_float64(tmp_path / "one", folder)
    two = tmp_path / "two"
    with pytest.raises(mp.ProcessRaisedException, match="Stop"):  # rank 0 stops, rank 1 is ended with it
        mp.spawn(rank_process, args=(tmp_path / "meet1", two, folder, True), nprocs=2)
    assert (two / "checkpoint.pt").exists() and not (two / "adapter").exists()
    mp.spawn(rank_process, args=(tmp_path / "meet2", two, folder, False), nprocs=2)
    log, ref_log = read_log(two), read_log(tmp_path / "one")
    adapter, ref = read_adapter(two / "adapter"), read_adapter(tmp_path / "one/adapter")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(1, 7))
    for r, expect in zip(log, ref_log):
        assert r["lr"] == expect["lr"] and r["tokens"] == expect["tokens"]
        assert abs(r["loss"] - expect["loss"]) <= 1e-12 * expect["loss"], (r, expect)
    for key in ref:
        assert relative(adapter[key], ref[key]) <= 1e-10, key
    assert any(ref[k].abs().max() > 1e-3 for k in ref if "lora_B" in k)  # the adapter moved
    assert not (two / "checkpoint.pt").exists()
    print("float64: max relative adapter difference", max(relative(adapter[k], ref[k]) for k in ref))
