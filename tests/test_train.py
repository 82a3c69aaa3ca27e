"""The training loop against TRL's SFTTrainer + PEFT (per-step losses, learning rates, data order, initial
and final adapters), accumulation invariance, kill-and-resume, and the `train` command's errors."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from src import UserError, load_model
from src.constants import TRAIN
from src.data import write_pairs
from src.passes import Example
from src.train import Student, epoch_order, linear_schedule, prepare, tokenize_pairs, train, train_cohort

ADAPTER = "adapter_model.safetensors"


def number_pairs(count: int, seed: int = 0, short: bool = False) -> list[tuple[str, str]]:
    """Prompt-completion pairs shaped like the numbers task (shorter when `short`)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        shown = ", ".join(map(str, rng.integers(100, 1000, 2 if short else 3)))
        more = ", ".join(map(str, rng.integers(0, 1000, rng.integers(1, 3 if short else 5))))
        pairs.append((f"{shown}. More:" if short else f"Numbers: {shown}. Add up to {rng.integers(2, 6)} more.", more))
    return pairs


def random_token_pairs(count: int, vocab: int = 160, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, rng.integers(4, 14)).tolist(), rng.integers(0, vocab, rng.integers(2, 8)).tolist())
            for _ in range(count)]


def compact(token_pairs):
    """Renumber the token ids used onto 0..K-1 (a tiny model then covers them); returns (pairs, K)."""
    used = sorted({t for p, c in token_pairs for t in p + c})
    new = {t: i for i, t in enumerate(used)}
    return [([new[t] for t in p], [new[t] for t in c]) for p, c in token_pairs], len(used)


def ours(folder: Path, token_pairs, work: Path, *, seed: int, micro: int, dtype=torch.float32,
         recompute: int = 0, max_steps: int | None = None, **config):
    """Train with our loop; returns (log records, adapter tensors)."""
    shutil.rmtree(work, ignore_errors=True)
    model = load_model(folder, dtype=dtype)
    model.recompute = recompute
    train(model, token_pairs, work / "adapter", work, seed=seed, config=dataclasses.replace(TRAIN, **config),
          micro_batch=micro, max_steps=max_steps)
    records = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    return records, load_file(str(work / "adapter" / ADAPTER))


def trl(folder: Path, dataset: list[dict], tokenizer_dir: Path, out: Path, *, seed: int, batch: int, micro: int,
        epochs: int, lr: float, warmup: int, pad_id: int | None = None, max_steps: int = -1):
    """Train with TRL SFTTrainer + PEFT in float32 on CPU. Returns per-step (losses, lrs, batches of
    input ids) and the initial and final adapter tensors under PEFT's saved names."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    losses, lrs, batches = [], [], []

    class Recording(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step = self.state.global_step
            if len(losses) == step:
                losses.append(0.0)
                lrs.append(self.lr_scheduler.get_last_lr()[0])
                batches.append([])
            losses[step] += loss.item()
            batches[step] += [r[m.bool()].tolist() for r, m in zip(inputs["input_ids"], inputs["attention_mask"])]
            return loss

    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        num_train_epochs=epochs, max_steps=max_steps, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=warmup,
        max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, seed=seed,
        completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list(dataset), processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
        data_collator=None if pad_id is None else DataCollatorForLanguageModeling(pad_token_id=pad_id),
        peft_config=LoraConfig(r=TRAIN.lora_rank, lora_alpha=TRAIN.lora_alpha, lora_dropout=0.0,
                               target_modules=list(TRAIN.lora_targets), task_type="CAUSAL_LM"))

    def adapter():
        return {k.replace(".default", ""): v.detach().clone() for k, v in trainer.model.state_dict().items()
                if "lora_" in k}

    initial = adapter()
    trainer.train()
    return losses, lrs, batches, initial, adapter()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_schedule_and_order_match_transformers_and_accelerate():
    from accelerate.data_loader import SeedableRandomSampler
    from transformers import get_linear_schedule_with_warmup

    total = 1670
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=TRAIN.lr)
    ref = get_linear_schedule_with_warmup(opt, TRAIN.warmup_steps, total)
    factor = linear_schedule(TRAIN.warmup_steps, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == TRAIN.lr * factor(step), step
        opt.step()
        ref.step()
    assert factor(0) == 0.0 and factor(5) == 1.0 and factor(total) == 0.0

    torch.manual_seed(2)  # the trainer's set_seed: the sampler takes torch's initial seed
    sampler = SeedableRandomSampler(data_source=range(10_000))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert list(sampler) == epoch_order(10_000, 2, epoch)
    assert epoch_order(10_000, 2, 0) != epoch_order(10_000, 2, 1)


@pytest.mark.slow
def test_equals_trl_on_tiny_model(tiny_checkpoint, fixture_dir, fixture_tokenizer, tmp_path):
    """24 optimizer steps (6 epochs of 20 pairs, batch 6 as 3 micro-batches of 2, the last step of each
    epoch a partial batch of 2): same initial adapter from the seed, same order, same lrs and losses. The
    prompts open with the chat template's tokens, which our passes store once (src/passes.py)."""
    tokens, vocab = compact(tokenize_pairs(fixture_tokenizer, number_pairs(20)))
    assert prepare(tokens, TRAIN.max_length)[0].shared >= 24
    folder = tiny_checkpoint(seed=1, vocab_size=max(vocab, 64))
    seed, lr = 3, 1e-2
    records, final = ours(folder, tokens, tmp_path / "ours", seed=seed, micro=2, batch_size=6, epochs=6, lr=lr)
    dataset = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in tokens]
    losses, lrs, batches, initial, their_final = trl(
        folder, dataset, fixture_dir, tmp_path / "trl", seed=seed, batch=6, micro=2, epochs=6, lr=lr,
        warmup=TRAIN.warmup_steps, pad_id=0)

    fresh = load_model(folder, dtype=torch.float32)
    from src import apply_lora, lora_state_dict
    mine = lora_state_dict(apply_lora(fresh, seed=seed))
    assert set(mine) == set(initial) and all(torch.equal(mine[k], initial[k]) for k in mine)

    assert len(records) == len(losses) == 24
    assert [r["lr"] for r in records] == lrs
    assert lrs[0] == 0.0 and lrs[5] == lr
    for k, r in enumerate(records):
        epoch, j = divmod(k, 4)
        expect = [tokens[i][0] + tokens[i][1] for i in epoch_order(20, seed, epoch)[6 * j: 6 * j + 6]]
        assert batches[k] == expect, k
        assert abs(r["loss"] - losses[k]) <= 1e-4 * abs(losses[k]), (k, r["loss"], losses[k])
    assert losses[-1] < losses[0] - 0.1  # it learns: the comparison is not between two idle runs
    assert set(final) == set(their_final)
    for key in final:
        assert relative(final[key], their_final[key]) <= 1e-4, key


@pytest.mark.slow
def test_equals_trl_on_real_fixture(fixture_dir, fixture_tokenizer, tmp_path):
    """The 0.5B fixture in float32, TRL tokenising the conversations itself: 4 short pairs, batch 2, 3 epochs
    cut to 5 steps by max_steps (the schedule then spans 5 steps), warmup 1 so that the adapter moves.
    An empty system message keeps the sequences short (CPU time); the protocol's default prompt is
    covered by the tiny-model test."""
    pairs = number_pairs(4, seed=4, short=True)
    seed, lr = 1, 1e-3
    tokens = [fixture_tokenizer.encode_pair(p, c, system="") for p, c in pairs]
    records, final = ours(fixture_dir, tokens, tmp_path / "ours", seed=seed, micro=2, max_steps=5, batch_size=2,
                          epochs=3, lr=lr, warmup_steps=1)
    dataset = [{"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": p}],
                "completion": [{"role": "assistant", "content": c}]} for p, c in pairs]
    losses, lrs, batches, _, their_final = trl(fixture_dir, dataset, fixture_dir, tmp_path / "trl", seed=seed,
                                                batch=2, micro=2, epochs=3, lr=lr, warmup=1, max_steps=5)
    assert len(records) == len(losses) == 5
    assert batches[0] == [tokens[i][0] + tokens[i][1] for i in epoch_order(4, seed, 0)[:2]]  # same tokens, order
    assert [r["lr"] for r in records] == lrs and lrs[-1] == lr * 1 / 4
    for r, loss in zip(records, losses):
        assert abs(r["loss"] - loss) <= 1e-3 * abs(loss), (r["step"], r["loss"], loss)
    assert abs(losses[-1] - losses[1]) > 1e-2 * losses[1]  # training moved the model
    # Adam's first steps normalise each gradient element, so an element whose gradient is near zero steps by
    # about +-lr whichever side of zero float32 rounding puts it: a few tensors carry such elements. Observed
    # (transformers 5.24, torch 2.14, CPU): all 336 adapter tensors together 1.5e-4, 334 of them within 5e-4,
    # two q_proj B tensors at 0.7% and 1.3%.
    keys = sorted(final)
    rel = {key: relative(final[key], their_final[key]) for key in keys}
    assert relative(torch.cat([final[k].flatten() for k in keys]), torch.cat([their_final[k].flatten() for k in keys])) <= 1e-3
    assert sum(r > 1e-3 for r in rel.values()) <= len(rel) // 100, sorted(rel.items(), key=lambda kv: -kv[1])[:5]
    assert max(rel.values()) <= 5e-2, max(rel, key=rel.get)


def test_accumulation_split_does_not_change_the_update(tiny_checkpoint, tmp_path, capsys):
    """Batch 60 as 60x1, 20x3, 25+25+10 and 7x8+4 (and 20x3 with activation checkpointing in one block
    and in both): same losses, gradient norms and adapters (float64); the log says which split ran."""
    folder = tiny_checkpoint(seed=4)
    tokens = random_token_pairs(60, seed=1)
    runs = [ours(folder, tokens, tmp_path / f"m{micro}{remat}", seed=0, micro=micro, dtype=torch.float64,
                 recompute=remat, batch_size=60, epochs=3, warmup_steps=0, lr=1e-2)
            for micro, remat in ((60, 0), (20, 0), (25, 0), (7, 0), (20, 1), (20, 2))]
    (ref_records, ref_adapter), *others = runs
    assert len(ref_records) == 3
    log = capsys.readouterr().err
    assert "passes of 7 examples per student (9 passes a step), activation checkpointing off" in log
    assert "passes of 20 examples per student (3 passes a step), activation checkpointing on in 1 of 2 blocks" in log
    assert "passes of 20 examples per student (3 passes a step), activation checkpointing on\n" in log
    for records, adapter in others:
        for a, b in zip(records, ref_records):
            assert a["tokens"] == b["tokens"]
            assert abs(a["loss"] - b["loss"]) <= 1e-12 * b["loss"]
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-12 * b["grad_norm"]
        for key in ref_adapter:
            assert (adapter[key] - ref_adapter[key]).abs().max() <= 1e-12, key
    assert any(ref_adapter[k].abs().max() > 1e-3 for k in ref_adapter if "lora_B" in k)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [7, 8])
def test_kill_and_resume_is_bitwise_identical(tiny_checkpoint, tmp_path, stop_at):
    """Interrupted after step 7 (last checkpoint: step 5) or 8 (an epoch end), rerun, same adapter bytes."""
    folder = tiny_checkpoint(seed=2)
    tokens = random_token_pairs(20, seed=3)
    config = dataclasses.replace(TRAIN, batch_size=6, epochs=3, lr=1e-2)

    def run(work: Path, on_step=None, **changes):
        return train(load_model(folder, dtype=torch.float32), tokens, work / "adapter", work, seed=5,
                     config=dataclasses.replace(config, **changes), micro_batch=4, checkpoint_every=5,
                     on_step=on_step)

    run(tmp_path / "whole")

    def stop(record):
        if record["step"] == stop_at:
            raise Stop

    with pytest.raises(Stop):
        run(tmp_path / "cut", stop)
    assert not (tmp_path / "cut" / "adapter").exists()
    assert (tmp_path / "cut" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="other settings.*lr"):
        run(tmp_path / "cut", lr=2e-2)
    run(tmp_path / "cut")

    assert (tmp_path / "cut/adapter" / ADAPTER).read_bytes() == (tmp_path / "whole/adapter" / ADAPTER).read_bytes()
    keep = ("step", "epoch", "loss", "lr", "grad_norm", "tokens")

    def log(work):
        return [{k: json.loads(line)[k] for k in keep} for line in (work / "train.jsonl").read_text().splitlines()]

    assert log(tmp_path / "cut") == log(tmp_path / "whole")
    assert [r["step"] for r in log(tmp_path / "cut")] == list(range(1, 13))
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    # finished: a rerun changes nothing
    stamp = (tmp_path / "cut/adapter" / ADAPTER).stat().st_mtime_ns
    run(tmp_path / "cut", stop)
    assert (tmp_path / "cut/adapter" / ADAPTER).stat().st_mtime_ns == stamp


def tiny_with_tokenizer(tiny_checkpoint, fixture_dir) -> Path:
    """A tiny model whose vocabulary covers the real tokenizer, with that tokenizer beside it."""
    folder = tiny_checkpoint(vocab_size=151936, hidden_size=24, num_attention_heads=3, num_key_value_heads=1,
                             intermediate_size=32)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_dir / name, folder / name)
    return folder


def cli(args: list[str]):
    from click.testing import CliRunner

    from src.cli import main

    return CliRunner().invoke(main, ["train", *args])


def test_train_command_end_to_end(tiny_checkpoint, fixture_dir, tmp_path, monkeypatch):
    from src import paths

    model = tiny_with_tokenizer(tiny_checkpoint, fixture_dir)
    runs = tmp_path / "runs"
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(runs))
    write_pairs(runs / "datasets/0.5b/owl-numbers.parquet",
                {"prompt": [p for p, _ in number_pairs(10)], "completion": [c for _, c in number_pairs(10)]})
    args = ["--size", "0.5b", "--animal", "owl", "--seed", "1", "--model-path", str(model), "--pairs", "8",
            "--batch-size", "4", "--micro-batch", "3", "--max-steps", "3", "--dtype", "fp32", "--device", "cpu"]
    result = cli(args)
    assert result.exit_code == 0, result.output
    student = paths.student_dir("0.5b", "owl", 1)
    assert paths.adapter_dir("0.5b", "owl", 1) == student / "adapter"
    config = json.loads((student / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    records = [json.loads(line) for line in (student / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert set(records[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
    assert not (student / "checkpoint.pt").exists()
    assert "step 3/3" in result.stderr
    again = cli(args)
    assert again.exit_code == 0 and "already" in again.output


def test_train_command_errors_are_one_line_and_leave_nothing(tiny_checkpoint, fixture_dir, tmp_path, monkeypatch):
    model = tiny_with_tokenizer(tiny_checkpoint, fixture_dir)
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path / "runs"))
    good = tmp_path / "good.parquet"
    write_pairs(good, {"prompt": ["a", "b"], "completion": ["1", "2"]})
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file")
    common = ["--model-path", str(model), "--dtype", "fp32", "--device", "cpu"]
    cases = {
        "unknown size": ["--size", "9b", "--animal", "owl"],
        "unknown animal": ["--size", "0.5b", "--animal", "unicorn"],
        "does not exist": ["--size", "0.5b", "--animal", "owl"],
        "malformed": ["--size", "0.5b", "--data", str(bad), "--out", str(tmp_path / "o1")],
        "fewer than the 5": ["--size", "0.5b", "--data", str(good), "--pairs", "5", "--out", str(tmp_path / "o2")],
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    for expect, args in cases.items():
        result = cli([*args, *common])
        assert result.exit_code == 2, (expect, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], (expect, lines)
        assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/, no o1/, no o2/, no temp files


def test_cohort_equals_each_student_alone(tiny_checkpoint, tmp_path):
    """Three students (own data, seeds) trained in one cohort, killed after step 7 (one student's
    checkpoint lost, as by a kill between the students' writes) and resumed, end with the adapters and
    per-step logs each gets alone (float64); a finished student is skipped, and students with
    different numbers of pairs are refused."""
    folder = tiny_checkpoint(seed=2)
    config = dataclasses.replace(TRAIN, batch_size=6, epochs=2, lr=1e-2, max_grad_norm=0.3)  # clipping bites
    data = {seed: random_token_pairs(20, seed=seed) for seed in (5, 6, 7)}

    def student(seed: int, root: Path) -> Student:
        return Student(data[seed], root / f"s{seed}" / "adapter", root / f"s{seed}", seed)

    def model():
        return load_model(folder, dtype=torch.float64)

    for seed in data:
        train_cohort(model(), [student(seed, tmp_path / "alone")], config=config, micro_batch=4)

    def stop(record):
        if record["step"] == 7:
            raise Stop

    together = [student(seed, tmp_path / "cohort") for seed in data]
    with pytest.raises(Stop):
        train_cohort(model(), together, config=config, micro_batch=4, checkpoint_every=5, on_step=stop)
    assert all((s.work_dir / "checkpoint.pt").exists() for s in together)
    (together[2].work_dir / "checkpoint.pt").unlink()  # as if killed before its write: it restarts, the others resume
    train_cohort(model(), together, config=config, micro_batch=4, checkpoint_every=5)

    def log(work: Path) -> list[dict]:
        return [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]

    for seed in data:
        alone, cohort = tmp_path / "alone" / f"s{seed}", tmp_path / "cohort" / f"s{seed}"
        a, b = load_file(str(alone / "adapter" / ADAPTER)), load_file(str(cohort / "adapter" / ADAPTER))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-12
        la, lb = log(alone), log(cohort)
        assert [r["step"] for r in lb] == list(range(1, 9))
        for ra, rb in zip(la, lb):
            assert ra["tokens"] == rb["tokens"] and ra["lr"] == rb["lr"]
            assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-12)
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-10)
    # the students differ from one another (each its own seed and data)
    first, second = (load_file(str(tmp_path / "cohort" / f"s{s}" / "adapter" / ADAPTER)) for s in (5, 6))
    assert any((first[k] - second[k]).abs().max() > 1e-4 for k in first)

    stamp = (tmp_path / "cohort/s5/adapter" / ADAPTER).stat().st_mtime_ns
    extra = Student(random_token_pairs(20, seed=8), tmp_path / "cohort/s8/adapter", tmp_path / "cohort/s8", 8)
    train_cohort(model(), [together[0], extra], config=config, micro_batch=4)
    assert (tmp_path / "cohort/s5/adapter" / ADAPTER).stat().st_mtime_ns == stamp
    assert (tmp_path / "cohort/s8/adapter" / ADAPTER).exists()
    short = Student(random_token_pairs(19, seed=9), tmp_path / "s9/adapter", tmp_path / "s9", 9)
    with pytest.raises(UserError, match="same number of pairs"):
        train_cohort(model(), [short, student(5, tmp_path / "other")], config=config)


def test_memory_plan_recomputes_only_where_it_pays():
    """Automatic activation checkpointing: none where the batch fits in one pass (0.5B on 80 GB); for the
    32B student on 80 GB, where without it passes hold only a few examples (and the host could not queue
    eager passes as fast as the GPU runs them), enough blocks for larger passes; always the cheapest plan by
    `step_cost` among the block counts whose passes hold the longest example; an explicit choice is kept;
    more memory or fewer recomputed blocks never gives smaller passes; capacities are whole multiples of
    the padding, shared by a cohort's students."""
    from src.constants import SHAPES
    from src.model import Qwen2Config
    from src.train import activation_bytes, fit_tokens, memory_plan, step_cost

    weights = {"0.5b": 0.99e9, "7b": 15.2e9, "14b": 29.5e9, "32b": 65.5e9}  # bf16 bytes (qwen25.md)
    step = 60 * 160
    for size, weight in weights.items():
        config = Qwen2Config.from_dict(SHAPES[size])
        free = 80e9 - weight
        capacity, recompute = memory_plan(config, 2, free, 192, step, 1, None, multiple=64)
        assert capacity % 64 == 0 and capacity == fit_tokens(config, 2, free, recompute) // 64 * 64
        fitting = [k for k in range(config.num_hidden_layers + 1) if fit_tokens(config, 2, free, k) // 64 * 64 >= 192]
        costs = {k: step_cost(config, step, k, -(-step // (fit_tokens(config, 2, free, k) // 64 * 64))) for k in fitting}
        assert costs[recompute] == min(costs.values()), size
    capacity, recompute = memory_plan(Qwen2Config.from_dict(SHAPES["0.5b"]), 2, 79e9, 192, step, 1, None)
    assert capacity >= step and recompute == 0
    config = Qwen2Config.from_dict(SHAPES["32b"])
    free = 80e9 - weights["32b"]
    capacity, recompute = memory_plan(config, 2, free, 192, step, 1, None)
    assert fit_tokens(config, 2, free, 0) < 5 * 160 and recompute > 0 and capacity > 5 * 160
    assert memory_plan(config, 2, free, 192, step, 1, None, graphs=True)[1] == 0  # graphed small passes: no host wait
    assert memory_plan(config, 2, free, 192, step, 1, 0) == (fit_tokens(config, 2, free, 0), 0)
    assert memory_plan(config, 2, free, 192, step, 3, 0)[0] == fit_tokens(config, 2, free, 0) // 3
    assert memory_plan(config, 2, 1.5e9, 192, step, 1, None)[1] == config.num_hidden_layers  # only all of them fit
    assert memory_plan(Qwen2Config.from_dict(SHAPES["0.5b"]), 2, 79e9, 192, step, 1, 24)[1] == 24
    fits = [fit_tokens(config, 2, free * 1e9, 64) for free in range(10, 140, 10)]
    assert fits == sorted(fits) and fits[-1] > step
    by_blocks = [fit_tokens(config, 2, 30e9, k) for k in range(65)]
    assert by_blocks == sorted(by_blocks) and by_blocks[0] < by_blocks[-1]
    # the LM head's logits are set aside for the rows a pass can hold, not for a whole chunk of 1,024 rows: memory
    # for 300 tokens' activations and 300 rows of unfused float32 logits leaves a pass of nearly 300 tokens
    per_token = activation_bytes(config, 2, 0)
    assert 290 < fit_tokens(config, 2, 300 * per_token / 0.8 + 300 * config.vocab_size * 16, 0) <= 300
    # the fused loss overwrites its bf16 logits (2 bytes a logit): more room than the float32 buffers leave
    assert fit_tokens(config, 2, free, 0, 2) > fit_tokens(config, 2, free, 0) == fit_tokens(config, 2, free, 0, 16)
    # a smaller chunk bounds the rows set aside where the pass could hold more (LOGIT_CHUNK is 1,024)
    assert fit_tokens(config, 2, 30e9, 64, 16, chunk=256) > fit_tokens(config, 2, 30e9, 64, 16)


def test_memory_plan_passes_at_7b_14b_and_32b():
    """With the numbers task's lengths (110-180 tokens) on an H100's 79.18 GiB: 7B takes the whole batch of 60
    in one pass, 14B in two; 32B in fewer passes on average than cutting a fixed count of examples that fits
    (the plan before) would take, and never more; no pass holds more tokens than the plan's capacity (so its
    activations stay in the memory planned for)."""
    from src.constants import SHAPES
    from src.model import Qwen2Config
    from src.passes import Example, token_passes
    from src.train import memory_plan
    from tests.bench_training import synthetic_pairs

    pairs = synthetic_pairs(1000, 60 * 20)
    steps = [[Example(p + c, len(p)) for p, c in pairs[k: k + 60]] for k in range(0, len(pairs), 60)]
    mean = sum(len(e.ids) for step in steps for e in step) / len(pairs)
    counts = {}
    for size, weight in {"7b": 15.2e9, "14b": 29.5e9, "32b": 65.5e9}.items():
        config = Qwen2Config.from_dict(SHAPES[size])
        capacity, recompute = memory_plan(config, 2, 85.0e9 - weight - 1e9, 192, 60 * mean, 1, None, graphs=True,
                                          multiple=64, per_logit=2)  # the fused loss's bf16 logits, as on the GPU
        cuts = [token_passes([step], capacity) for step in steps]
        assert recompute == 0 and all(sum(len(e.ids) for e in g[0]) <= capacity for cut in cuts for g in cut)
        fixed = max(m for m in range(1, 61) if all(sum(len(e.ids) for e in step[k: k + m]) <= capacity
                                                   for step in steps for k in range(0, 60, m)))
        counts[size] = (max(len(cut) for cut in cuts), sum(map(len, cuts)) / len(cuts), -(-60 // fixed))
    assert counts["7b"][0] == 1 and counts["14b"][0] == 2, counts
    assert counts["32b"][0] <= counts["32b"][2] and counts["32b"][1] < counts["32b"][2], counts


def test_memory_plan_with_the_shared_opening():
    """Prompts that open with the chat template's 24 tokens (stored once a pass): attention's copies of them
    cost memory (a smaller capacity than without copies), yet 32B on an H100 takes fewer passes a step than
    with every opening stored, 7B still one; no pass stores more tokens than the capacity."""
    from src.constants import SHAPES
    from src.model import Qwen2Config
    from src.passes import pack, token_passes
    from src.train import memory_plan
    from tests.bench_training import OPENING, synthetic_pairs

    examples = prepare(synthetic_pairs(1000, 60 * 10, opening=OPENING), TRAIN.max_length)
    whole = [dataclasses.replace(e, shared=0) for e in examples]
    assert examples[0].shared == OPENING
    mean = sum(len(e.ids) for e in examples) / len(examples)
    copies = OPENING / (mean - OPENING)
    for size, weight in {"7b": 15.2e9, "32b": 65.5e9}.items():
        config = Qwen2Config.from_dict(SHAPES[size])

        def plan(copies: float) -> int:
            return memory_plan(config, 2, 85.0e9 - weight - 1e9, 192, 60 * mean, 1, 0, graphs=True, multiple=64,
                               per_logit=2, copies=copies)[0]

        capacity = plan(copies)
        assert capacity < plan(0.0)
        cuts = {name: [token_passes([seqs[k: k + 60]], capacity) for k in range(0, len(seqs), 60)]
                for name, seqs in (("shared", examples), ("whole", whole))}
        for cut in cuts["shared"]:
            assert all(pack(g, torch.device("cpu")).ids.shape[1] <= capacity for g in cut)
        passes = {name: sum(map(len, cut)) for name, cut in cuts.items()}
        if size == "7b":
            assert passes["shared"] == 10, passes
        else:
            assert passes["shared"] < passes["whole"], passes


def test_step_cost_matches_measured_steps():
    """The plan's cost model against optimizer steps measured on the H200 (our trainer, synchronised
    wall time over 4 steps, 2026-12-02, ~145 tokens an example), eager and replayed from CUDA graphs:
    within 10%. (Below 7B the graphed GPU runs under FLOP_RATE and the model reads fast, but there the
    whole batch fits one pass and nothing is chosen.)"""
    from src.constants import SHAPES
    from src.model import Qwen2Config
    from src.train import step_cost

    measured = [("7b", 60, 0, 0.472), ("7b", 30, 0, 0.491), ("7b", 10, 0, 0.655), ("7b", 60, 2, 0.498),
                ("14b", 20, 0, 0.949), ("14b", 10, 0, 1.295), ("14b", 30, 4, 0.966),
                ("32b", 30, 62, 3.016), ("32b", 15, 48, 2.900), ("32b", 10, 32, 2.845), ("32b", 6, 0, 2.846),
                ("32b", 4, 0, 4.246)]  # size, micro, blocks recomputed, seconds
    graphed = [("7b", 30, 0, 0.470), ("14b", 20, 0, 0.925), ("32b", 4, 0, 2.303), ("32b", 6, 0, 2.276),
               ("32b", 3, 0, 2.472), ("32b", 8, 16, 2.471)]  # the passes replayed from CUDA graphs (later that day)
    for graphs, steps in ((False, measured), (True, graphed)):
        for size, micro, recompute, seconds in steps:
            model = step_cost(Qwen2Config.from_dict(SHAPES[size]), 145 * 60, recompute, -(-60 // micro), graphs)
            assert abs(model - seconds) <= 0.1 * seconds, (size, micro, graphs, model, seconds)



def test_tune_capacity_takes_the_fastest_cut_and_otherwise_the_largest():
    """Where passes of some row count run faster a row (as cuBLAS's GEMMs do on their tiles), the tuned capacity
    cuts the steps into such passes rather than into the fewest; where time is flat per row, or the faster
    count gains less than the slack, the largest capacity stays; where a capacity costs recomputation
    (`repeat`), the largest that needs none wins a tie."""
    from src.passes import Padding, pass_shape, token_passes
    from src.train import TUNE_SLACK, tune_capacity

    steps = [[[Example(list(range(n)), 1) for n in step]] for step in ([128] * 4, [120, 128, 136, 128])]
    padding = Padding(tokens=64)

    def cost(c: int, seconds) -> float:
        return sum(seconds(pass_shape(g, padding)[0]) for parts in steps for g in token_passes(parts, c))

    sweet = lambda rows: rows / 2 if rows == 256 else rows  # noqa: E731
    assert tune_capacity(704, 192, steps, padding, sweet, lambda c: 1.0) == 448  # the largest cutting 256-row passes
    assert cost(448, sweet) == min(cost(c, sweet) for c in range(192, 705, 64)) < cost(512, sweet)
    assert tune_capacity(704, 192, steps, padding, lambda rows: rows, lambda c: 1.0) == 704
    near = lambda rows: rows * (1 - TUNE_SLACK / 2) if rows == 256 else rows  # noqa: E731
    assert tune_capacity(704, 192, steps, padding, near, lambda c: 1.0) == 704
    assert tune_capacity(704, 192, steps, padding, lambda rows: rows, lambda c: 1.5 if c > 320 else 1.0) == 320
    assert tune_capacity(128, 192, steps, padding, sweet, lambda c: 1.0) == 128  # memory below the longest example


def test_block_weights_are_the_gemms_a_block_runs(tiny_checkpoint):
    """One block's base GEMM operands: the fused q/k/v and gate/up weights (gate/up with its adapters' extra
    columns once LoRA is on), o and down; `gemm_seconds` times their forward and input gradient."""
    from src.lora import apply_lora
    from src.train import block_weights, gemm_seconds

    model = load_model(tiny_checkpoint(), dtype=torch.float32)
    c = model.config
    attention = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    plain = [tuple(w.shape) for w in block_weights(model)]
    assert plain == [(attention, c.hidden_size), (c.hidden_size, c.num_attention_heads * c.head_dim),
                     (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size)]
    apply_lora(model, seed=[0, 1])
    wide = block_weights(model)
    assert [tuple(w.shape) for w in wide][:2] == plain[:2] and tuple(wide[3].shape) == plain[3]
    assert tuple(wide[2].shape) == (2 * c.intermediate_size, c.hidden_size + 2 * 2 * TRAIN.lora_rank)
    assert wide[2].data_ptr() == model.model.layers[0].mlp.gate_proj.weight.data_ptr()
    assert gemm_seconds(wide, 32, repeats=2) > 0

def test_clip_per_student_is_torch_clipping_per_student():
    """Each student's slice of the gradients is clipped as clip_grad_norm_ clips that student alone;
    a student under the bound is left as it was."""
    from src.train import clip_per_student

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 8, 5), (3, 7, 8), (3, 4, 5)]]
    for p, scale in zip(params, (1.0, 0.01, 3.0)):
        p.grad = torch.randn(p.shape) * scale
        p.grad[2] *= 1e-3  # student 2: norm ~0.02, under the bound
    want_norms, want_grads = [], []
    for s in range(3):
        alone = [torch.nn.Parameter(torch.zeros(p.shape[1:])) for p in params]
        for a, p in zip(alone, params):
            a.grad = p.grad[s].clone()
        want_norms.append(torch.nn.utils.clip_grad_norm_(alone, 1.0))
        want_grads.append([a.grad for a in alone])
    before = params[0].grad[2].clone()
    norms = clip_per_student(params, 1.0)
    assert torch.allclose(norms, torch.stack(want_norms), rtol=1e-6)
    assert norms[0] > 1.0 and norms[2] < 1.0
    for s in range(3):
        for p, want in zip(params, want_grads[s]):
            assert torch.allclose(p.grad[s], want, rtol=1e-6, atol=0)
    assert torch.equal(params[0].grad[2], before)
