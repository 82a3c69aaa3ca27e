"""The benchmarks run end to end on the CPU (tiny shapes), so a change to the trainer or the sampler
cannot silently break the tools that measure them; their numbers are checked for sense, not speed."""
from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from src.checkpoint import random_model
from src.model import Qwen2Config
from src.train import Student, train_cohort
from tests import bench_decode, bench_sampling, bench_training
from tests.cheap import one_thread  # noqa: F401 (fixture)


def test_training_benchmark_times_whole_steps(one_thread, tmp_path):
    """Ours is timed over steps 4..N from outside the trainer; on the CPU (nothing overlaps) that agrees
    with the trainer's own per-step times. The table has both sides; fewer than 4 steps is refused."""
    steps = 6
    pairs = bench_training.synthetic_pairs(1000, 60 * steps)
    result = bench_training.run_ours("tiny", pairs, steps, None, None, "cpu", 790.0)
    records: list[dict] = []
    model = random_model(Qwen2Config.from_dict(bench_training.TINY), dtype=torch.float32)
    train_cohort(model, [Student(pairs, Path(tmp_path) / "a", Path(tmp_path) / "w", 0)], max_steps=steps,
                 checkpoint_every=10**9, on_step=records.append)
    own = statistics.median(r["tokens"] / r["tokens_per_s"] for r in records[3:])
    assert result.impl == "ours" and result.micro == 60 and 0.3 < result.step_s / own < 3.0

    out = CliRunner().invoke(bench_training.main, ["--sizes", "tiny", "--steps", "4", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.output.splitlines() if line.startswith(" tiny")]
    assert [r[1] for r in rows] == ["ours", "trl+peft"] and rows[0][-1].endswith("x")
    out = CliRunner().invoke(bench_training.main, ["--sizes", "tiny", "--steps", "4", "--device", "cpu", "--micro", "0",
                                                   "--micro", "20", "--no-reference"])
    assert out.exit_code == 0, out.output
    assert [line.split()[2] for line in out.output.splitlines() if line.startswith(" tiny")] == ["60x1", "20x3"]
    refused = CliRunner().invoke(bench_training.main, ["--sizes", "tiny", "--steps", "3", "--device", "cpu"])
    assert refused.exit_code == 2 and "--steps" in refused.output


def test_sampling_benchmark_runs_both_sides(one_thread):
    out = CliRunner().invoke(bench_sampling.main, ["--size", "tiny", "--device", "cpu", "--batch", "3",
                                                   "--new-tokens", "4", "--repeats", "1"])
    assert out.exit_code == 0, out.output
    row = out.output.strip().splitlines()[-1].split()
    assert row[0] == "3" and all(r.endswith("x") and float(r[:-1]) > 0 for r in row[6:8])
    assert row[8] == "3"  # slots used: all of the batch on the CPU
    assert float(row[9]) > 0 and row[10].endswith("%") and row[11].endswith("%")


def test_sampling_floor_counts_each_weight_once_per_token_and_step():
    """`floor_seconds` against the tiny shape counted by hand: blocks of q/k/v (with biases), o, gate/up, down
    and two norms, the final norm; the tied table as the LM head. At one slot a step is the read of every
    weight; at many slots its FLOPs."""
    t = bench_sampling.TINY
    h, i, d = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * d, t["num_key_value_heads"] * d
    block = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
    body, head = t["num_hidden_layers"] * block + h, t["vocab_size"] * h
    model = random_model(Qwen2Config.from_dict(t), dtype=torch.bfloat16, device="cpu")
    tera = 1e12
    one = bench_sampling.floor_seconds(model, 1, 10, 5, 1000.0, 1.0)  # 1,000 TFLOP/s, 1 TB/s
    assert one == pytest.approx(2 * (body * 10 + head) / (1000 * tera) + 4 * (body + head) * 2 / tera)
    many = bench_sampling.floor_seconds(model, 10**6, 10, 5, 1000.0, 1.0)
    assert many == pytest.approx((2 * (body * 10 + head) + 4 * 2 * (body + head)) * 10**6 / (1000 * tera))


def test_decode_benchmark_swaps_in_the_replaced_paths_and_back(one_thread):
    """Inside `replaced_paths` the cached layout gets no kernels (SDPA) and the draw the torch pick; both
    come back after; the table has both sides, their ratio and the share of identical sequences (all of
    them on the CPU, where both sides run the same code)."""
    from src import attention, sampler
    from src.fused import fused_kernels

    kernels = fused_kernels()
    before = attention.fused_kernels, kernels.pick if kernels else None
    with bench_decode.replaced_paths():
        assert attention.fused_kernels() is None
        assert kernels is None or kernels.pick is sampler.pick
    assert (attention.fused_kernels, kernels.pick if kernels else None) == before
    out = CliRunner().invoke(bench_decode.main, ["--size", "tiny", "--device", "cpu", "--batch", "3",
                                                 "--new-tokens", "4", "--repeats", "1"])
    assert out.exit_code == 0, out.output
    row = out.output.strip().splitlines()[-1].split()
    assert row[0] == "3" and float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith("x")
    assert float(row[4]) == 1.0 and row[5] == "3"


def test_pass_plan_compares_both_cuts_on_a_dataset(fixture_dir, tmp_path):
    """`tests/plan_passes.py` on a small numbers dataset (~100 tokens a pair, 27 of them the same opening): a row
    per size; at 32B (passes of a few examples) cutting by tokens takes fewer passes and no more rows a step than a
    fixed count of examples, and storing the opening once fewer of both again; at 14B it halves the passes."""
    import numpy as np

    from src.data import write_pairs
    from tests import plan_passes

    rng = np.random.default_rng(0)
    numbers = lambda n: ", ".join(str(x) for x in rng.integers(100, 1000, n))  # noqa: E731
    prompts = [f"Continue: {numbers(int(rng.integers(3, 12)))}" for _ in range(240)]
    data = write_pairs(tmp_path / "pairs.parquet", {"prompt": prompts,
                                                    "completion": [numbers(int(rng.integers(2, 12))) for _ in prompts]})
    out = CliRunner().invoke(plan_passes.main, ["--data", str(data), "--tokenizer", str(fixture_dir),
                                                "--sizes", "14b,32b", "--epochs", "1"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: [float(x) for x in line.split()[1:] if x != "|"] for line in out.output.splitlines()
            if line.split() and line.split()[0] in ("14b", "32b")}
    _, passes, fixed_rows, capacity, whole, whole_rows, once_capacity, once, once_rows = rows["32b"]
    assert 1 < once < whole <= passes and once_rows < whole_rows <= fixed_rows and capacity % 64 == 0
    assert once_capacity < capacity  # attention's copies of the opening take memory
    # 14B: ~5,900 tokens a step, a pass ~5,000: two; the opening stored once leaves ~4,300 rows: one
    assert rows["14b"][1] == rows["14b"][4] == 2 and rows["14b"][7] == 1


def test_gemm_benchmark_lists_every_group_at_every_row_count(one_thread):
    """`tests/bench_gemm.py` on the CPU (tiny shape): a row per row count, forward and input gradient of the four
    projection groups, and a block's time per row."""
    from tests import bench_gemm

    out = CliRunner().invoke(bench_gemm.main, ["--size", "tiny", "--device", "cpu", "--rows", "64", "--rows", "96",
                                               "--repeats", "2"])
    assert out.exit_code == 0, out.output
    rows = [line.split() for line in out.output.splitlines()[2:]]
    assert [r[0] for r in rows] == ["64", "96"] and all(len(r) == 11 and float(r[-1]) > 0 for r in rows)


def test_decode_step_profile_runs_with_every_slot_held(one_thread, capsys):
    """`tests/profile_sampling.py --step-kernels` on the CPU (tiny shape, no graph): every slot held, the step timed,
    its operators listed, most time first."""
    from tests import profile_sampling

    model = random_model(Qwen2Config.from_dict(bench_training.TINY), dtype=torch.float32)
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(3)]
    profile_sampling.decode_step(model, prompts, new_tokens=4, rows=5, steps=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("decode step, 3 slots held: eager") and float(lines[0].split()[6]) > 0
    times = [float(line.split()[0]) for line in lines[2:]]
    assert len(times) == 5 and times == sorted(times, reverse=True) and times[0] > 0

