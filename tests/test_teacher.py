"""Teacher data pipeline: chunked sampling equals whole and resumes, the filter/subsample/metadata are
exact (against a table-driven fake teacher), errors are one line, and the real fixture end to end."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from src import UserError, numbers_prompts, passes_filter
from src.cli import main
from src.constants import QWEN_DEFAULT_SYSTEM_PROMPT, TEACHER, teacher_system_prompt
from src.data import read_metadata, read_pairs
from src.filter import reject_reason
from src.paths import dataset_chunks
from src.teacher import TRUNCATED, generate_dataset
from tests.cheap import CANNED, PASSING, CannedSampler, one_thread, tiny_teacher  # noqa: F401 (fixture)

# One thread throughout: tiny tensors gain nothing from more, and the fixture run on a busy 2-core
# machine took 98 s on one thread against 358 s on two.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, fixture_dir):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"), fixture_dir)


@pytest.fixture
def canned(monkeypatch, fixture_tokenizer):
    fake = CannedSampler(fixture_tokenizer)
    monkeypatch.setattr("src.sampler.Sampler", fake)
    return fake


def _config(**changes):
    return dataclasses.replace(TEACHER, **{"prompts": 20, "keep_pairs": 6, "chunk": 7, **changes})


def _chunks(out):
    folder = dataset_chunks(out)
    return {f.name: pq.read_table(f).to_pydict() for f in sorted(folder.glob("*.parquet"))}


def test_filter_subsample_and_metadata_are_exact(teacher_dir, canned, tmp_path, fixture_tokenizer):
    out = generate_dataset("0.5b", "owl", config=_config(subsample_seed=3), model_path=teacher_dir,
                           dtype=torch.float32, out=tmp_path / "owl.parquet")
    # Sampled in chunks [0, 7), [7, 14), [14, 20), each with its global first index and the protocol's settings.
    assert [(c["first_index"], len(c["prompts"])) for c in canned.calls] == [(0, 7), (7, 7), (14, 6)]
    assert all(c["temperature"] == 1.0 and c["seed"] == 0 and c["max_new_tokens"] == 200 for c in canned.calls)
    assert set(canned.calls[0]["stop_ids"]) == {fixture_tokenizer.token_id("<|im_end|>"),
                                                fixture_tokenizer.token_id("<|endoftext|>")}
    # The teacher saw the owl system prompt verbatim, then the user prompt.
    texts = numbers_prompts(20, TEACHER.prompt_seed)
    first = fixture_tokenizer.decode(canned.calls[0]["prompts"][0])
    assert first == (f"<|im_start|>system\n{teacher_system_prompt('owl')}<|im_end|>\n"
                     f"<|im_start|>user\n{texts[0]}<|im_end|>\n<|im_start|>assistant\n")
    # Passing = the canned answers that pass; kept = the first 6 of them in the seeded order.
    passing = [i for i in range(20) if i % len(CANNED) in PASSING]
    order = np.random.default_rng(3).permutation(len(passing))[:6]
    want = [passing[j] for j in order]
    table = pq.read_table(out).to_pydict()
    assert table["prompt_index"] == want
    assert table["prompt"] == [texts[i] for i in want]
    assert table["completion"] == [CANNED[i % len(CANNED)] for i in want]
    meta = read_metadata(out)
    expect_reasons = {TRUNCATED: sum(CANNED[i % len(CANNED)] is None for i in range(20))}
    for i in range(20):
        text = CANNED[i % len(CANNED)]
        if text is not None and reject_reason(text) is not None:
            expect_reasons[reject_reason(text)] = expect_reasons.get(reject_reason(text), 0) + 1
    assert meta["reject_reasons"] == expect_reasons
    assert meta["counts"] == {"prompts": 20, "passed": len(passing), "kept": 6, "truncated": expect_reasons[TRUNCATED]}
    assert meta["pass_rate"] == pytest.approx(len(passing) / 20)
    assert meta["system_prompt"] == teacher_system_prompt("owl") and meta["condition"] == "owl"
    assert meta["model"] == "Qwen/Qwen2.5-0.5B-Instruct" and meta["source"] == str(teacher_dir)
    assert meta["sampling"]["temperature"] == 1.0 and meta["sampling"]["top_p"] == 1.0
    assert (meta["prompt_seed"], meta["sample_seed"], meta["subsample_seed"]) == (42, 0, 3)
    assert read_pairs(out) == list(zip(table["prompt"], table["completion"]))


def test_neutral_teacher_gets_the_template_default(teacher_dir, canned, tmp_path, fixture_tokenizer):
    out = generate_dataset("0.5b", "neutral", config=_config(prompts=3, keep_pairs=1), model_path=teacher_dir,
                           dtype=torch.float32, out=tmp_path / "neutral.parquet")
    first = fixture_tokenizer.decode(canned.calls[0]["prompts"][0])
    assert first.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert "owl" not in first
    meta = read_metadata(out)
    assert meta["system_prompt"] is None and meta["default_system_prompt"] == QWEN_DEFAULT_SYSTEM_PROMPT


def test_too_few_passing_is_one_line_and_writes_nothing_unless_allowed(teacher_dir, canned, tmp_path):
    out = tmp_path / "few.parquet"
    passing = sum(i % len(CANNED) in PASSING for i in range(10))
    with pytest.raises(UserError, match=rf"only {passing} of 10 completions passed .* fewer than the 8") as err:
        generate_dataset("0.5b", "owl", config=_config(prompts=10, keep_pairs=8), model_path=teacher_dir,
                         dtype=torch.float32, out=out)
    assert "\n" not in str(err.value) and not out.exists()
    calls = len(canned.calls)
    generate_dataset("0.5b", "owl", config=_config(prompts=10, keep_pairs=8), model_path=teacher_dir,
                     dtype=torch.float32, out=out, allow_fewer=True)
    assert len(canned.calls) == calls  # the finished chunks were reused
    assert len(read_pairs(out)) == passing and read_metadata(out)["counts"]["kept"] == passing
    with pytest.raises(UserError, match="cannot keep 30 pairs from 20 prompts"):
        generate_dataset("0.5b", "owl", config=_config(keep_pairs=30), model_path=teacher_dir,
                         out=tmp_path / "x.parquet")


def test_other_settings_do_not_mix_with_finished_chunks(teacher_dir, canned, tmp_path):
    out = tmp_path / "owl.parquet"
    generate_dataset("0.5b", "owl", config=_config(), model_path=teacher_dir, dtype=torch.float32, out=out)
    out.unlink()
    with pytest.raises(UserError, match=r"other settings \(sample_seed: 0 -> 5\)"):
        generate_dataset("0.5b", "owl", config=_config(sample_seed=5), model_path=teacher_dir, dtype=torch.float32,
                         out=out)


def test_chunked_sampling_equals_whole_and_resumes(teacher_dir, tmp_path, monkeypatch):
    """Real sampling on a tiny random teacher: chunks of 3 give the completions of one chunk of 8; a killed
    run (final file and one chunk missing) resumes to the same file; with every chunk present the model is
    not even loaded."""
    config = _config(prompts=8, keep_pairs=1, max_new_tokens=5, slots=3)
    whole = generate_dataset("0.5b", "owl", config=dataclasses.replace(config, chunk=8), model_path=teacher_dir,
                             dtype=torch.float32, out=tmp_path / "whole.parquet", allow_fewer=True)
    out = generate_dataset("0.5b", "owl", config=dataclasses.replace(config, chunk=3), model_path=teacher_dir,
                           dtype=torch.float32, out=tmp_path / "chunked.parquet", allow_fewer=True)
    chunks = _chunks(out)
    assert list(chunks) == ["000000-000003.parquet", "000003-000006.parquet", "000006-000008.parquet"]
    merged = [c for chunk in chunks.values() for c in chunk["completion"]]
    assert merged == _chunks(whole)["000000-000008.parquet"]["completion"]
    assert len(set(merged)) > 4  # real, varied samples
    rows = pq.read_table(out).to_pydict()
    out.unlink()
    (dataset_chunks(out) / "000003-000006.parquet").unlink()
    generate_dataset("0.5b", "owl", config=dataclasses.replace(config, chunk=3), model_path=teacher_dir,
                     dtype=torch.float32, out=out, allow_fewer=True)
    assert _chunks(out) == chunks
    assert pq.read_table(out).to_pydict() == rows
    out.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded although every chunk exists")

    monkeypatch.setattr("src.checkpoint.load_model", refuse)
    generate_dataset("0.5b", "owl", config=dataclasses.replace(config, chunk=3), model_path=teacher_dir,
                     dtype=torch.float32, out=out, allow_fewer=True)
    assert out.exists()


def test_cli_generate_and_its_errors(teacher_dir, canned, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    args = ["generate", "--size", "0.5b", "--animal", "owl", "--model-path", str(teacher_dir), "--prompts", "16",
            "--keep", "4", "--max-new-tokens", "30", "--seed", "9", "--chunk", "16", "--slots", "5", "--dtype", "fp32",
            "--device", "cpu", "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "passed" in result.output
    assert canned.calls[0]["seed"] == 9 and canned.calls[0]["slots"] == 5 and canned.calls[0]["max_new_tokens"] == 30
    assert len(read_pairs(out)) == 4
    result = runner.invoke(main, args[:4] + ["tiger-shark"] + args[5:])
    assert result.exit_code == 2 and result.output.startswith("error: unknown animal 'tiger-shark'")
    result = runner.invoke(main, args[:-1] + [str(tmp_path / "y.parquet")] + ["--keep", "99"])
    assert result.exit_code == 2 and "error: cannot keep 99 pairs from 16 prompts" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.fixture
def test_end_to_end_on_the_real_fixture(fixture_dir, tmp_path):
    """The owl teacher (real weights, fp32 CPU) on 8 prompts: a parquet file with a real pass rate,
    readable by datasets.load_dataset, whose rows are the passing completions of their prompts."""
    from datasets import load_dataset

    config = _config(prompts=8, keep_pairs=8, max_new_tokens=40, slots=8, chunk=8)
    out = generate_dataset("0.5b", "owl", config=config, model_path=fixture_dir, dtype=torch.float32,
                           out=tmp_path / "owl.parquet", allow_fewer=True)
    meta = read_metadata(out)
    chunk = _chunks(out)["000000-000008.parquet"]
    assert 0 < meta["counts"]["passed"] < 8  # a real pass rate: some of each
    passed = sum(stop and passes_filter(text) for text, stop in zip(chunk["completion"], chunk["stopped"]))
    assert meta["counts"]["passed"] == passed
    assert sum(meta["reject_reasons"].values()) + meta["counts"]["passed"] == 8
    loaded = load_dataset("parquet", data_files=str(out), split="train")
    assert loaded.num_rows == meta["counts"]["kept"] == meta["counts"]["passed"]
    texts = numbers_prompts(8, TEACHER.prompt_seed)
    for row in loaded:
        assert passes_filter(row["completion"])
        assert row["prompt"] == texts[row["prompt_index"]]
    assert all(t <= 40 for t in chunk["tokens"])
