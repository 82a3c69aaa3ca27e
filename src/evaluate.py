"""Which animal does a model name as its favourite? Two evaluators over the same questions.

Sampling (the paper's measure): each question, chat-encoded (with the template's default system
prompt unless one is given), is answered `samples` times at temperature 1 by `src.sampler.sample`;
every answer is scored by `questions.classify`. An animal's rate is its share of all answers, with
two 95% intervals: `ci95`, Wilson's binomial interval, which holds the questions fixed and covers
the sampling noise alone (the one to compare with the logit evaluator on the same questions); and
`ci95_questions`, mean +- 1.96 standard errors of the per-question rates (normal approximation),
which also covers the choice of wording (the one to compare models asked different questions).

Logits (no sampling noise): per question, the exact probability that the reply is one of the
animal's spellings (`questions.spellings`) followed by an end token (`<|im_end|>` or
`<|endoftext|>`, where the sampler stops), i.e. the product of next-token probabilities over the
spelling's tokens and the end token, summed over spellings (disjoint complete replies, so sums over
spellings and animals are probabilities). Multi-word or rambling replies are not counted, so this
is the sampling rate's one-word part. Reported as the absolute probability and as the share within
the candidate animals, since fine-tuning on numbers raises every animal's probability.

The model is a base checkpoint alone or with a LoRA adapter applied unmerged (`lora.load_adapter`);
the adapter is a local folder or a Hub repo, `owner/name` or `owner/name/subfolder`.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import paths
from .attention import Cached
from .checkpoint import load_model
from .constants import CANDIDATE_ANIMALS, EVAL, check_animal, check_size, hub_id
from .errors import UserError
from .lora import CONFIG_FILE, WEIGHTS_FILE, is_adapter, load_adapter
from .model import Qwen2
from .questions import OTHER, QUESTIONS, classify, spellings
from .sampler import sample
from .tokenizer import ChatTokenizer, load_tokenizer

TRUNCATED = "…"  # marks a sampled reply that hit max_new_tokens before its end token


def pick_questions(count: int) -> list[str]:
    if not 1 <= count <= len(QUESTIONS):
        raise UserError(f"--questions must be between 1 and {len(QUESTIONS)}, got {count}")
    return list(QUESTIONS[:count])


def chat_prompts(tokenizer: ChatTokenizer, questions: Sequence[str], system: str | None) -> list[list[int]]:
    """Token ids of each question as one user turn, ready for the assistant's reply."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [tokenizer.encode_chat([*head, {"role": "user", "content": q}]) for q in questions]


def sample_answers(model: Qwen2, tokenizer: ChatTokenizer, prompts: Sequence[list[int]], samples: int, *,
                   seed: int = EVAL.sample_seed, max_new_tokens: int = EVAL.max_new_tokens,
                   batch: int = EVAL.batch) -> list[list[str]]:
    """`samples` replies per prompt at plain temperature 1, as text without special tokens; a reply
    cut at `max_new_tokens` before its end token gets a trailing TRUNCATED mark (so it never equals
    a complete one-word answer)."""
    repeated = [p for p in prompts for _ in range(samples)]
    out = sample(model, repeated, max_new_tokens=max_new_tokens, temperature=EVAL.temperature, seed=seed,
                 stop_ids=tokenizer.stop_ids, slots=batch, refill_every=EVAL.refill_every)
    stops = set(tokenizer.stop_ids)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) + ("" if ids and ids[-1] in stops else TRUNCATED)
             for ids in out]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def _rows(answers: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The answers that start no other answer (each runs once), shortest first, and for every answer
    the row it starts."""
    unique = list(dict.fromkeys(tuple(a) for a in answers))
    inner = {a[:k] for a in unique for k in range(len(a))}
    rows = sorted((a for a in unique if a not in inner), key=len)  # similar lengths share a batch
    start = {}
    for i, row in enumerate(rows):
        for k in range(len(row) + 1):
            start.setdefault(row[:k], i)
    return rows, [start[tuple(a)] for a in answers]


@torch.no_grad()
def answer_logprobs(model: Qwen2, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                    end_ids: Sequence[int], batch: int = EVAL.batch) -> Tensor:
    """log P(reply = answer tokens then one of `end_ids`) [prompts, answers], float64.

    Every prompt but its last token runs once into a KV cache. Answers that start another answer are
    read off the longer one, so only the maximal ones ("rows") run: each (prompt, row) pair is the
    prompt's last token plus the row, forwarded `batch` pairs at a time over a copy of the prompt's
    cache. Position t of a pair gives the log-probs of row token t and of the end tokens after t tokens.
    Pairs go in order of row length, so a batch pads only to its own longest row.
    """
    if not prompts or not answers:
        return torch.zeros(len(prompts), len(answers), dtype=torch.float64)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt")
    device = model.device
    rows, row_of = _rows(answers)
    width = max(len(r) for r in rows) + 1
    cached = torch.tensor([len(p) - 1 for p in prompts], device=device)
    prefix = max(int(cached.max()), 1)
    prompt_cache = model.new_cache(len(prompts), prefix)
    ids = torch.zeros(len(prompts), prefix, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p) - 1] = torch.tensor(p[:-1], device=device)
    positions = torch.arange(prefix, device=device).expand(len(prompts), prefix)
    model.hidden(ids, Cached(prompt_cache, torch.arange(len(prompts), device=device), positions, prefix, fresh=True))

    last = torch.tensor([p[-1] for p in prompts], device=device)
    row_ids = torch.zeros(len(rows), width - 1, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        row_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    ends = torch.tensor(list(end_ids), device=device)
    pair_row = torch.arange(len(rows), device=device).repeat_interleave(len(prompts))
    pair_prompt = torch.arange(len(prompts), device=device).repeat(len(rows))
    pair_width = [len(rows[i]) + 1 for i in range(len(rows)) for _ in prompts]
    work = model.new_cache(min(batch, len(pair_row)), prefix + width)
    table = torch.empty(len(prompts), len(rows), width, dtype=torch.float64, device=device)
    for start in range(0, len(pair_row), batch):
        p, r = pair_prompt[start:start + batch], pair_row[start:start + batch]
        b, w = len(p), pair_width[min(start + batch, len(pair_width)) - 1]
        work.k[:, :b, :, :prefix] = prompt_cache.k[:, p]
        work.v[:, :b, :, :prefix] = prompt_cache.v[:, p]
        following = row_ids[r, : w - 1]
        tokens = torch.cat([last[p, None], following], dim=1)
        pos = cached[p, None] + torch.arange(w, device=device)
        hidden = model.hidden(tokens, Cached(work, torch.arange(b, device=device), pos, int(pos.max()) + 1))
        logits = model.logits(hidden).float()
        norm = logits.logsumexp(-1)
        token_lp = (logits[:, :-1].gather(-1, following[..., None])[..., 0] - norm[:, :-1]).double()
        end_lp = (logits[:, :, ends].logsumexp(-1) - norm).double()
        table[p, r, :w] = torch.cat([token_lp.new_zeros(b, 1), token_lp.cumsum(1)], dim=1) + end_lp
    lengths = torch.tensor([len(a) for a in answers], device=device)
    return table[:, torch.tensor(row_of, device=device), lengths].cpu()


def spelling_ids(tokenizer: ChatTokenizer, animals: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of every spelling of every animal, and the index of the animal each belongs to."""
    ids, owner = [], []
    for i, animal in enumerate(animals):
        for text in spellings(animal):
            ids.append(tokenizer.encode(text))
            owner.append(i)
    return ids, owner


def animal_probabilities(model: Qwen2, tokenizer: ChatTokenizer, prompts: Sequence[Sequence[int]],
                         animals: Sequence[str], batch: int = EVAL.batch) -> Tensor:
    """P(the reply is one of the animal's spellings) [prompts, animals], float64."""
    ids, owner = spelling_ids(tokenizer, animals)
    probs = answer_logprobs(model, prompts, ids, tokenizer.stop_ids, batch).exp()
    return torch.zeros(len(prompts), len(animals), dtype=torch.float64).index_add_(1, torch.tensor(owner), probs)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def question_interval(rates: Sequence[float], z: float = 1.96) -> tuple[float, float] | None:
    """Mean of per-question rates +- z standard errors across questions, clipped to [0, 1]
    (None for a single question)."""
    q = len(rates)
    if q < 2:
        return None
    mean = sum(rates) / q
    se = math.sqrt(sum((r - mean) ** 2 for r in rates) / (q - 1) / q)
    return max(0.0, mean - z * se), min(1.0, mean + z * se)


def summarise(questions: Sequence[str], answers: Sequence[Sequence[str]], probs: Tensor,
              animals: Sequence[str]) -> dict:
    """Per-animal rates of both evaluators, and the question-level data they come from.

    Besides the scored rate, the sampling side counts the answers that are exactly one of the
    animal's spellings (`one_word_*`): the logit evaluator's probability is that rate's expectation."""
    exact = {text: animal for animal in animals for text in spellings(animal)}
    counts = [Counter(classify(a, tuple(animals)) for a in replies) for replies in answers]
    one_word = [Counter(exact[a] for a in replies if a in exact) for replies in answers]
    sizes = [len(replies) for replies in answers]
    total = sum(sizes)
    candidate_mass = probs.sum().item()
    summary = {}
    for j, animal in enumerate([*animals, OTHER]):
        k = sum(c[animal] for c in counts)
        entry = {"count": k, "rate": k / total, "ci95": wilson(k, total),
                 "ci95_questions": question_interval([c[animal] / n for c, n in zip(counts, sizes)])}
        if animal == OTHER:
            entry |= {"probability": 1.0 - probs.sum(1).mean().item(), "share": None}
        else:
            k1 = sum(c[animal] for c in one_word)
            entry |= {"one_word_count": k1, "one_word_rate": k1 / total, "one_word_ci95": wilson(k1, total),
                      "probability": probs[:, j].mean().item(),
                      "share": probs[:, j].sum().item() / candidate_mass if candidate_mass > 0 else None}
        summary[animal] = entry
    detail = [{"question": q, "answers": list(replies), "counts": dict(c), "one_word_counts": dict(w),
               "probability": {a: probs[i, j].item() for j, a in enumerate(animals)}}
              for i, (q, replies, c, w) in enumerate(zip(questions, answers, counts, one_word))]
    return {"answers": total, "animals": summary, "per_question": detail}


def settings(questions: int, samples: int, system: str | None, seed: int, max_new_tokens: int) -> dict:
    """What a result depends on besides the model (recorded with it; equal settings, equal result)."""
    return {"questions": questions, "samples": samples, "system": system, "sample_seed": seed,
            "temperature": EVAL.temperature, "max_new_tokens": max_new_tokens}


def evaluate(model: Qwen2, tokenizer: ChatTokenizer, *, questions: int = EVAL.questions,
             samples: int = EVAL.samples, system: str | None = None,
             animals: Sequence[str] = CANDIDATE_ANIMALS, seed: int = EVAL.sample_seed,
             max_new_tokens: int = EVAL.max_new_tokens, batch: int = EVAL.batch) -> dict:
    """Both evaluators on the first `questions` questions; a JSON-ready result."""
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    longest = max(len(ids) for ids in spelling_ids(tokenizer, animals)[0])
    if max_new_tokens <= longest:  # the sampler could not finish every answer the logit side counts
        raise UserError(f"max_new_tokens {max_new_tokens} cannot hold a {longest}-token answer and its end token")
    asked = pick_questions(questions)
    prompts = chat_prompts(tokenizer, asked, system)
    answers = sample_answers(model, tokenizer, prompts, samples, seed=seed, max_new_tokens=max_new_tokens, batch=batch)
    probs = animal_probabilities(model, tokenizer, prompts, animals, batch)
    return {"settings": settings(questions, samples, system, seed, max_new_tokens),
            **summarise(asked, answers, probs, animals)}


def resolve_adapter(adapter: str | Path) -> Path:
    """A local adapter folder, or one downloaded from the Hub (`owner/name[/subfolder]`)."""
    folder = Path(adapter).expanduser()
    if folder.is_dir():
        if not is_adapter(folder):
            raise UserError(f"{folder} is not an adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
        return folder
    parts = str(adapter).strip("/").split("/")
    if len(parts) < 2 or str(adapter).startswith((".", "~", "/")):
        raise UserError(f"no adapter folder {str(adapter)!r} and it is not a Hub id (owner/name[/subfolder])")
    from .hub import download

    sub = "/".join(parts[2:])
    patterns = [f"{sub}/{f}" if sub else f for f in (CONFIG_FILE, WEIGHTS_FILE)]
    folder = download("/".join(parts[:2]), patterns) / sub
    if not is_adapter(folder):
        raise UserError(f"Hub repo {'/'.join(parts[:2])!r} has no adapter files under {sub or 'its root'!r}")
    return folder


def load_evaluated(source: str | Path, adapter: str | Path | None = None, *, dtype: torch.dtype = torch.bfloat16,
                   device: str = "cpu") -> tuple[Qwen2, ChatTokenizer]:
    """The model to evaluate: a checkpoint (folder, size or Hub id), plus an adapter when given."""
    folder = resolve_adapter(adapter) if adapter is not None else None
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=dtype, device=device)
    if folder is not None:
        load_adapter(model, folder)
    return model, tokenizer


def write_json(data: dict, path: str | Path) -> Path:
    """Write atomically (tmp file + rename), so a crash leaves no half-written result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def study_target(size: str | None, model_path: str | None, base: bool, animal: str | None, seed: int | None,
                 adapter: str | None, out: str | None, system: str | None,
                 teacher: str | None = None) -> tuple[str, str | None, Path]:
    """(model source, adapter, output file) for the CLI's ways of naming what to evaluate.

    --base, or a student by --animal/--seed, with --size: the study's runs/ layout (the adapter from
    runs/students/ unless --adapter says otherwise); --base under an animal `teacher`'s system prompt
    goes to runs/eval/{size}/teacher-{animal}.json, which the report shows beside the students.
    Anything else, and any evaluation under a custom --system prompt, must name its output with --out."""
    if base and (animal is not None or adapter is not None):
        raise UserError("--base evaluates the untouched model; drop --animal/--adapter")
    if (animal is None) != (seed is None):
        raise UserError("a student is named by both --animal and --seed")
    if not base and animal is None and adapter is None:
        raise UserError("say what to evaluate: --base, --animal A --seed K, or --adapter DIR")
    if size is None and model_path is None:
        raise UserError("give --size or --model-path")
    size = check_size(size) if size is not None else None
    animal = check_animal(animal) if animal is not None else None
    if animal is not None and adapter is None:
        if size is None:
            raise UserError("a student (--animal/--seed) is found by --size; or give --adapter")
        adapter = str(paths.adapter_dir(size, animal, seed))
        if not is_adapter(adapter):
            raise UserError(f"no trained student at {adapter}; train it first or give --adapter")
    if teacher is not None and base and size is not None:
        layout = paths.teacher_eval_file(size, check_animal(teacher, allow_neutral=False))
    else:
        layout = paths.eval_file(size, animal, seed) if size is not None and system is None else None
    target = Path(out) if out is not None else layout
    if target is None:
        raise UserError("--out FILE is needed outside the study's runs/ layout "
                        "(no --size, or a --system prompt)")
    return model_path or hub_id(size), adapter, target


def run(source: str, adapter: str | None, out: Path, *, dtype: torch.dtype, device: str, **options) -> dict:
    """Load, evaluate and write one model's result (identity + settings + both evaluators)."""
    model, tokenizer = load_evaluated(source, adapter, dtype=dtype, device=device)
    result = {"model": str(source), "adapter": None if adapter is None else str(adapter),
              "dtype": str(dtype).removeprefix("torch."),
              **evaluate(model, tokenizer, **options)}
    write_json(result, out)
    return result


def headroom(entry: dict) -> bool:
    """An animal can show an effect: named at all, and not already dominant."""
    return 0 < entry["rate"] < EVAL.headroom


def format_table(result: dict, limit: int | None = None, mark: str | None = None) -> str:
    """The per-animal table, by sampling rate then probability (highest first)."""
    s = result["settings"]
    lines = [f"{result['model']}{' + ' + result['adapter'] if result.get('adapter') else ''}: "
             f"{result['answers']} answers ({s['questions']} questions x {s['samples']})"
             + (f", system prompt {s['system']!r}" if s["system"] else ""),
             f"  {'animal':<10} {'sampled':>8} {'95% CI':>15} {'P(1 word)':>10} {'share':>7}  headroom"]
    order = sorted(result["animals"].items(), key=lambda kv: (-kv[1]["rate"], -kv[1]["probability"]))
    for animal, e in order[:limit]:
        lo, hi = e["ci95"]
        share = "" if e["share"] is None else f"{e['share']:.1%}"
        flag = "" if animal == OTHER else ("yes" if headroom(e) else "no")
        star = "*" if animal == mark else " "
        lines.append(f"{star} {animal:<10} {e['rate']:>8.1%} [{lo:>5.1%}, {hi:>5.1%}] "
                     f"{e['probability']:>10.2%} {share:>7}  {flag}")
    return "\n".join(lines)


def sweep(sizes: Sequence[str], *, model_path: str | None = None, out: str | None = None,
          questions: int = EVAL.questions, samples: int = EVAL.samples, seed: int = EVAL.sample_seed,
          batch: int = EVAL.batch, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> list[dict]:
    """Base-rate sweep: each model's preference over the candidate animals (both evaluators).

    A size writes runs/eval/{size}/base.json (its base evaluation) and reuses that file when it holds
    the same evaluation, so a rerun resumes; --model-path evaluates one checkpoint into --out."""
    options = dict(questions=questions, samples=samples, seed=seed, batch=batch)
    if model_path is not None:
        if out is None:
            raise UserError("--model-path needs --out FILE for the sweep's result")
        return [run(model_path, None, Path(out), dtype=dtype, device=device, **options)]
    if not sizes:
        raise UserError("give --size (repeatable) or --model-path")
    same = {"adapter": None, "dtype": str(dtype).removeprefix("torch."),
            "settings": settings(questions, samples, None, seed, EVAL.max_new_tokens)}
    results = []
    for size in map(check_size, sizes):
        path = paths.eval_file(size)
        old = json.loads(path.read_text()) if path.exists() else {}
        same["model"] = hub_id(size)
        if all(old.get(k) == v for k, v in same.items()):
            results.append(old)
        else:
            results.append(run(hub_id(size), None, path, dtype=dtype, device=device, **options))
    return results


def common_headroom(results: Sequence[dict]) -> list[str]:
    """Candidate animals with headroom in every result, in the candidate list's order."""
    return [a for a in CANDIDATE_ANIMALS if all(a in r["animals"] and headroom(r["animals"][a]) for r in results)]
