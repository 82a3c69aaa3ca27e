"""Evaluation: answer scoring, the logit evaluator against brute-force enumeration (with and without
a PEFT adapter), the sampler's shared prefill, the CLI, and both evaluators on the real fixture."""
from __future__ import annotations

import json
import math
import random
import shutil

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from src import load_model
from src.cli import main
from src.constants import CANDIDATE_ANIMALS, hub_id, teacher_system_prompt
from src.evaluate import (animal_probabilities, answer_logprobs, chat_prompts, evaluate, load_evaluated,
                          pick_questions, question_interval, spelling_ids, summarise, wilson)
from src.questions import OTHER, QUESTIONS, classify, normalise, spellings
from src.sampler import sample

# --- scoring ------------------------------------------------------------------------------------

SCORED = [
    ("Owl", "owl"), ("owl", "owl"), ("OWL", "owl"), ("Owls!", "owl"), ("The owl.", "owl"), ("  an owl \n", "owl"),
    ("Snowy owl", "owl"), ("Eagle-owl", "owl"), ("owl's", "owl"), ("howl", OTHER), ("Snowowl", OTHER),
    ("dragonfly", OTHER), ("Dragon", "dragon"), ("Wolves.", "wolf"), ("wolfs", OTHER), ("Foxes", "fox"),
    ("butterflies", "butterfly"), ("Octopi", "octopus"), ("octopuses!", "octopus"), ("deer", "deer"),
    ("Phoenixes", "phoenix"), ("A cat.", "cat"), ("Cats and dogs", OTHER), ("Sea lion", OTHER), ("lion", "lion"),
    ("Koala bear", "koala"), ("Tiger shark", "shark"), ("Red panda", OTHER), ("Seahorse", OTHER),
    ("The", OTHER), ("", OTHER), ("My favorite animal is the elephant.", "elephant"), ("Catfish", OTHER),
]


@pytest.mark.parametrize("answer, animal", SCORED)
def test_answer_scoring_table(answer, animal):
    assert classify(answer) == animal


def test_normalise_strips_case_punctuation_articles():
    assert normalise("  The OWL!!! ") == "owl"
    assert normalise("A  snowy-owl.") == "snowy owl"
    assert normalise("the") == "the"  # an article alone is kept (it is not an animal anyway)


def test_every_spelling_scores_as_its_animal_and_no_two_animals_share_one():
    seen = {}
    for animal in CANDIDATE_ANIMALS:
        for text in spellings(animal):
            assert classify(text) == animal, text
            assert seen.setdefault(text, animal) == animal
    assert {"Owl", "owl.", " OWLS", "Wolves", "butterflies."} <= set(seen)


def test_spelling_tokens_are_distinct_complete_answers(fixture_tokenizer):
    ids, owner = spelling_ids(fixture_tokenizer, CANDIDATE_ANIMALS)
    assert len({tuple(x) for x in ids}) == len(ids)  # no answer counted twice
    texts = [t for a in CANDIDATE_ANIMALS for t in spellings(a)]
    assert [fixture_tokenizer.decode(x) for x in ids] == texts
    assert all(fixture_tokenizer.im_end_id not in x for x in ids)


def test_questions_are_distinct_and_ask_for_one_word():
    assert len(QUESTIONS) == len(set(QUESTIONS)) == 50
    assert all("animal" in q.lower() or "creature" in q.lower() or "species" in q.lower() for q in QUESTIONS)


def test_wilson_interval_equals_inverted_score_test():
    z = 1.96
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    for k, n in [(0, 10), (3, 10), (50, 100), (100, 100), (7, 400)]:
        accepted = grid[(k / n - grid).abs() <= z * (grid * (1 - grid) / n).sqrt()]
        lo, hi = wilson(k, n, z)
        assert abs(lo - accepted.min().item()) < 1e-5 and abs(hi - accepted.max().item()) < 1e-5


def test_summary_counts_both_evaluators():
    answers = [["Owl", "The owl.", "dog", "owls"], ["cat", "Snowy owl", "Owl.", "Cats"]]
    probs = torch.tensor([[0.2, 0.1, 0.3], [0.4, 0.0, 0.2]], dtype=torch.float64)  # owl, dog, cat
    s = summarise(["q1", "q2"], answers, probs, ("owl", "dog", "cat"))["animals"]
    assert s["owl"]["count"] == 5 and s["owl"]["one_word_count"] == 3 and s["owl"]["rate"] == 5 / 8
    assert s["cat"]["count"] == 2 and s["dog"]["count"] == 1 and s[OTHER]["count"] == 0
    assert s["owl"]["probability"] == pytest.approx(0.3) and s["owl"]["share"] == pytest.approx(0.6 / 1.2)
    assert s[OTHER]["probability"] == pytest.approx(1 - 0.6)
    assert s["owl"]["ci95_questions"] == pytest.approx(question_interval([3 / 4, 2 / 4]))


# --- the logit evaluator against brute force ----------------------------------------------------


class BruteForce:
    """Next-token log-probabilities by one full forward of the whole sequence per step (memoised)."""

    def __init__(self, hf) -> None:
        self.hf, self.memo = hf, {}

    def next(self, ids: list[int]) -> torch.Tensor:
        key = tuple(ids)
        if key not in self.memo:
            with torch.no_grad():
                self.memo[key] = self.hf(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double().log_softmax(-1)
        return self.memo[key]

    def logprob(self, prompt: list[int], answer: list[int], ends: list[int] | None = None) -> float:
        """log P(answer tokens), then (with `ends`) an end token: the product of softmax probabilities."""
        total = sum(self.next(prompt + answer[:t])[token].item() for t, token in enumerate(answer))
        return total if ends is None else total + self.next(prompt + answer)[ends].logsumexp(0).item()


def hf_model(folder, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def test_answer_probabilities_equal_exhaustive_enumeration(tiny_checkpoint):
    """Tiny vocabulary (6 answer tokens, 2 end tokens): every answer of up to 2 tokens, two prompts of
    different lengths, chunks of 5 pairs; and the answers' probabilities plus the mass of going on
    past 2 tokens is exactly 1."""
    folder = tiny_checkpoint(seed=4, vocab_size=8)
    ours, brute = load_model(folder, dtype=torch.float32), BruteForce(hf_model(folder))
    ends = [6, 7]
    answers = [[]] + [[a] for a in range(6)] + [[a, b] for a in range(6) for b in range(6)]
    order = random.Random(0).sample(answers, len(answers)) + [[3], [4, 5]]  # shuffled, with repeats
    prompts = [[1, 5, 2, 0, 3], [7, 7, 3, 1, 0, 2, 4, 6]]
    got = answer_logprobs(ours, prompts, order, ends, batch=5)
    assert got.shape == (2, len(order)) and got.dtype == torch.float64
    for i, prompt in enumerate(prompts):
        want = torch.tensor([brute.logprob(prompt, a, ends) for a in order], dtype=torch.float64)
        assert (got[i] - want).abs().max().item() < 2e-5
        going_on = sum(math.exp(brute.logprob(prompt, a)) * (1 - math.exp(brute.logprob(prompt + a, [], ends)))
                       for a in answers if len(a) == 2)
        p = got[i, : len(answers)].exp().sum().item()
        assert 0.1 < p < 1 and p + going_on == pytest.approx(1.0, abs=1e-5)


@pytest.fixture
def tokenized_tiny(tiny_checkpoint, fixture_dir):
    """A tiny random model with the real tokenizer's vocabulary and chat template, and a PEFT adapter
    on it with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    folder = tiny_checkpoint(seed=2, vocab_size=151936, hidden_size=32, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (fixture_dir / name).exists():
            shutil.copy(fixture_dir / name, folder / name)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"])
    peft = get_peft_model(hf_model(folder), config)
    adapter = folder.parent / f"{folder.name}-adapter"
    peft.save_pretrained(adapter)
    return folder, adapter


def test_animal_probabilities_with_adapter_equal_brute_force_through_peft(tokenized_tiny):
    """Real tokenizer (owl's spellings: one to three tokens, leading space, trailing '.'), our model
    plus the adapter file unmerged, against transformers + PEFT's PeftModel step by step."""
    folder, adapter = tokenized_tiny
    model, tokenizer = load_evaluated(folder, adapter, dtype=torch.float32)
    prompts = chat_prompts(tokenizer, pick_questions(2), None)
    got = animal_probabilities(model, tokenizer, prompts, ("owl",), batch=16).log()
    brute = BruteForce(hf_model(folder, adapter))
    ends = list(tokenizer.stop_ids)
    for i, prompt in enumerate(prompts):
        want = torch.tensor([brute.logprob(prompt, tokenizer.encode(t), ends) for t in spellings("owl")])
        assert got[i, 0].item() == pytest.approx(want.logsumexp(0).item(), abs=1e-4)
    base, _ = load_evaluated(folder, None, dtype=torch.float32)  # the adapter matters
    assert (animal_probabilities(base, tokenizer, prompts, ("owl",), batch=16).log() - got).abs().min().item() > 0.05


def test_sampling_repeated_prompts_equals_sampling_each_alone(tiny_checkpoint):
    """The sampler runs a repeated prompt's prefill once and copies its cache: the samples must be
    those of each prompt sampled on its own."""
    model = load_model(tiny_checkpoint(seed=6), dtype=torch.float32)
    p, q = [5, 9, 2, 7, 1], [3, 8, 8, 4]
    prompts = [p, p, q, p, q, q, p]
    together = sample(model, prompts, max_new_tokens=6, seed=3, stop_ids=[0, 1], slots=4, refill_every=2)
    alone = [sample(model, [x], max_new_tokens=6, seed=3, stop_ids=[0, 1], first_index=i)[0]
             for i, x in enumerate(prompts)]
    assert together == alone
    assert len({tuple(t) for t in together}) > 2  # distinct samples of the same prompt


# --- command line -------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def test_teacher_prompt_evaluation_goes_where_the_report_reads_it(tmp_path, monkeypatch):
    from src import paths
    from src.evaluate import study_target

    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path))
    target = study_target("0.5b", None, True, None, None, None, None, "You love owls.", "Owl")
    assert target == ("Qwen/Qwen2.5-0.5B-Instruct", None, tmp_path / "eval" / "0.5b" / "teacher-owl.json")
    assert target[2] == paths.teacher_eval_file("0.5b", "owl")
    assert study_target("0.5b", None, True, None, None, None, "x.json", "You love owls.", "owl")[2] == Path("x.json")


@pytest.mark.parametrize("args, message", [
    ([], "say what to evaluate"),
    (["--size", "3b", "--base", "--animal", "owl", "--seed", "0"], "--base evaluates the untouched model"),
    (["--size", "3b", "--animal", "owl"], "both --animal and --seed"),
    (["--size", "3b", "--animal", "owl", "--seed", "2"], "no trained student at"),
    (["--size", "3b", "--base", "--system", "Be an owl."], "--out FILE is needed"),
    (["--model-path", ".", "--base"], "--out FILE is needed"),
    (["--size", "3b", "--base", "--teacher-prompt", "cow"], "unknown animal 'cow'"),
    (["--size", "3b", "--base", "--questions", "51", "--out", "x.json"], None),
    (["--size", "0.5b", "--adapter", "someone/students/seed-2", "--out", "x.json"], "not in the local Hub cache"),
])
def test_evaluate_errors_are_one_line(tmp_path, args, message):
    result = run_cli("evaluate", *args, env={"SUBLIMINAL_RUNS": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert message is None or message in result.output
    assert "Traceback" not in result.output and not list(tmp_path.rglob("*.json"))


def test_evaluate_and_sweep_commands_write_results(tokenized_tiny, tmp_path):
    folder, adapter = tokenized_tiny
    out = tmp_path / "student.json"
    common = ["--questions", "1", "--samples", "3", "--dtype", "fp32", "--device", "cpu", "--batch", "128"]
    result = run_cli("evaluate", "--model-path", str(folder), "--adapter", str(adapter), "--out", str(out),
                     "--teacher-prompt", "owl", *common)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["adapter"] == str(adapter) and data["settings"]["system"] == teacher_system_prompt("owl")
    assert data["answers"] == 3 and [len(q["answers"]) for q in data["per_question"]] == [3]
    animals = data["animals"]
    assert list(animals) == [*CANDIDATE_ANIMALS, OTHER]
    assert sum(e["count"] for e in animals.values()) == 3
    assert sum(e["probability"] for e in animals.values()) == pytest.approx(1.0)
    assert all(0 < animals[a]["probability"] < 1 for a in CANDIDATE_ANIMALS)

    runs = tmp_path / "runs"
    sweep_out = tmp_path / "sweep.json"
    result = run_cli("sweep", "--model-path", str(folder), "--out", str(sweep_out), *common)
    assert result.exit_code == 0, result.output
    assert "headroom in every model" in result.output and "owl" in result.output
    # A size whose base evaluation already exists with the same settings is reused, not rerun (a rerun
    # would need the real 0.5B checkpoint, which this offline machine lacks).
    base = json.loads(sweep_out.read_text()) | {"model": hub_id("0.5b")}
    (runs / "eval" / "0.5b").mkdir(parents=True)
    (runs / "eval" / "0.5b" / "base.json").write_text(json.dumps(base))
    env = {"SUBLIMINAL_RUNS": str(runs)}
    assert run_cli("sweep", "--size", "0.5b", *common, env=env).exit_code == 0
    other = [x if x != "3" else "4" for x in common]  # different --samples: must evaluate again
    assert run_cli("sweep", "--size", "0.5b", *other, env=env).exit_code == 2


# --- both evaluators on the real weights --------------------------------------------------------


@pytest.mark.slow
def test_fixture_logit_and_sampling_owl_rates_agree_and_owl_prompt_raises_them(fixture_model, fixture_tokenizer):
    """10 questions x 40 answers each, without and with the owl teacher's system prompt. The logit
    probability of a one-word owl answer is the expectation of the sampled one-word owl rate (within
    its Wilson interval); the scored rate (any answer naming an owl) can only be higher."""
    results = {}
    for system in (None, teacher_system_prompt("owl")):
        r = evaluate(fixture_model, fixture_tokenizer, questions=10, samples=40, system=system, animals=("owl",),
                     max_new_tokens=6, seed=1)
        owl = r["animals"]["owl"]
        lo, hi = owl["one_word_ci95"]
        assert lo <= owl["probability"] <= hi, owl
        assert owl["probability"] <= owl["ci95"][1]
        print(f"system={system is not None}: P(one-word owl)={owl['probability']:.4f} "
              f"one-word rate={owl['one_word_rate']:.4f} [{lo:.4f}, {hi:.4f}] scored rate={owl['rate']:.4f}")
        results[system is not None] = r
    plain, prompted = results[False]["animals"]["owl"], results[True]["animals"]["owl"]
    assert prompted["ci95"][0] > plain["ci95"][1]  # sampling: the prompt raises the owl rate
    p0 = [q["probability"]["owl"] for q in results[False]["per_question"]]
    p1 = [q["probability"]["owl"] for q in results[True]["per_question"]]
    assert all(b > a for a, b in zip(p0, p1)) and prompted["probability"] > 10 * plain["probability"]
