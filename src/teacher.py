"""Teacher data: numbers prompts -> the teacher's completions -> the filter -> a seeded subsample.

The teacher is the size's Instruct model; an animal teacher gets the protocol's system prompt
verbatim, the neutral teacher none (the chat template's default applies). Completions are plain
temperature-1 samples (src/sampler.py) that end at `<|im_end|>` or `<|endoftext|>`; a completion
that reaches `max_new_tokens` without a stop token is cut short, so it is rejected ("truncated")
rather than filtered as if complete. The passing pairs are shuffled with the subsample seed and
the first `keep_pairs` are written as the dataset (src/data.py format), with the counts, pass rate
and reject reasons in its metadata. Fewer passing pairs than `keep_pairs` is an error unless
`allow_fewer`, which keeps all that passed (the metadata says how many).

Resumable: prompts are sampled in chunks; each finished chunk is written atomically to
`<dataset>-chunks/` next to a `settings.json` of everything that decides its content, and a rerun
skips finished chunks (a rerun with other settings is refused rather than mixed in). Samples
depend on (seed, prompt index, token index), not on chunking or slots, so chunked output equals
one whole run (up to the floating-point effects of batching on the logits).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import paths
from .constants import (ENDOFTEXT, IM_END, TEACHER, TeacherConfig, check_animal, check_size, hub_id,
                        teacher_system_prompt)
from .data import read_metadata, write_pairs
from .errors import UserError
from .filter import REASONS, reject_reason
from .prompts import numbers_prompts

TRUNCATED = "truncated (no stop token within max_new_tokens)"
SETTINGS_FILE = "settings.json"


def _chunk_file(folder: Path, start: int, end: int) -> Path:
    return folder / f"{start:06d}-{end:06d}.parquet"


def _check_settings(folder: Path, settings: dict) -> None:
    """Record the settings with the first chunk; refuse to mix chunks made under others."""
    file = folder / SETTINGS_FILE
    if file.exists():
        old = json.loads(file.read_text())
        if old != settings:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                             if old.get(k) != settings.get(k))
            raise UserError(f"{folder} holds chunks sampled with other settings ({diff}); "
                            f"delete it or rerun with the same options")
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, file)


def generate_dataset(size: str, animal: str, *, config: TeacherConfig = TEACHER, model_path: str | Path | None = None,
                     device: str = "cpu", dtype: torch.dtype = torch.bfloat16, out: str | Path | None = None,
                     allow_fewer: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Sample, filter and subsample the teacher's numbers; return the dataset file (runs/ or `out`).

    An existing dataset file means the work is done and is returned untouched."""
    from .checkpoint import load_model
    from .sampler import Sampler
    from .tokenizer import load_tokenizer

    size, animal = check_size(size), check_animal(animal)
    out = Path(out) if out is not None else paths.dataset_file(size, animal)
    say = log or (lambda _: None)
    if out.exists():
        say(f"{out} exists; delete it to generate again")
        return out
    if config.keep_pairs > config.prompts and not allow_fewer:
        raise UserError(f"cannot keep {config.keep_pairs} pairs from {config.prompts} prompts; "
                        f"raise --prompts or lower --keep")
    system = teacher_system_prompt(animal)
    source = str(model_path) if model_path is not None else size
    tokenizer = load_tokenizer(source)
    texts = numbers_prompts(config.prompts, config.prompt_seed)
    settings = {"source": hub_id(size) if model_path is None else str(model_path), "system_prompt": system,
                "prompt_seed": config.prompt_seed, "sample_seed": config.sample_seed,
                "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                "dtype": str(dtype).removeprefix("torch.")}
    folder = paths.dataset_chunks(out)
    _check_settings(folder, settings)

    ranges = [(s, min(s + config.chunk, len(texts))) for s in range(0, len(texts), config.chunk)]
    sampler = None
    for number, (start, end) in enumerate(ranges, 1):
        file = _chunk_file(folder, start, end)
        if file.exists():
            continue
        if sampler is None:
            say(f"loading {settings['source']} ({settings['dtype']}, {device})")
            sampler = Sampler(load_model(source, dtype=dtype, device=device), max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, seed=config.sample_seed, stop_ids=tokenizer.stop_ids,
                              slots=config.slots)
        messages = [([{"role": "system", "content": system}] if system is not None else [])
                    + [{"role": "user", "content": text}] for text in texts[start:end]]
        began = time.perf_counter()
        outputs = sampler([tokenizer.encode_chat(m) for m in messages], first_index=start)
        seconds = time.perf_counter() - began
        stopped = [bool(ids) and ids[-1] in tokenizer.stop_ids for ids in outputs]
        completions = [tokenizer.decode(ids[:-1] if stop else ids) for ids, stop in zip(outputs, stopped)]
        tokens = sum(map(len, outputs))
        write_pairs(file, {"prompt": texts[start:end], "completion": completions,
                           "prompt_index": list(range(start, end)), "stopped": stopped,
                           "tokens": [len(ids) for ids in outputs]}, {"seconds": seconds})
        say(f"chunk {number}/{len(ranges)}: prompts {start}-{end - 1}, {tokens} tokens in {seconds:.0f}s "
            f"({tokens / max(seconds, 1e-9):.0f} tokens/s)")

    files = [_chunk_file(folder, s, e) for s, e in ranges]
    table = pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()
    seconds = sum(read_metadata(f)["seconds"] for f in files)
    reasons: Counter = Counter()
    passed = []
    for row, (completion, stop) in enumerate(zip(table["completion"], table["stopped"])):
        reason = reject_reason(completion) if stop else TRUNCATED
        if reason is None:
            passed.append(row)
        else:
            reasons[reason] += 1
    rate = len(passed) / len(texts)
    if len(passed) < config.keep_pairs and not allow_fewer:
        raise UserError(f"only {len(passed)} of {len(texts)} completions passed the filter ({rate:.1%}), fewer than "
                        f"the {config.keep_pairs} to keep; raise --prompts (finished chunks are reused) or pass "
                        f"--allow-fewer")
    order = np.random.default_rng(config.subsample_seed).permutation(len(passed))[: config.keep_pairs]
    kept = [passed[j] for j in order]
    metadata = {
        "size": size, "condition": animal, "model": hub_id(size), **settings,
        "default_system_prompt": tokenizer.system_default if system is None else None,
        "sampling": {"temperature": config.temperature, "top_p": 1.0, "top_k": None, "repetition_penalty": 1.0,
                     "max_new_tokens": config.max_new_tokens, "stop": [IM_END, ENDOFTEXT]},
        "subsample_seed": config.subsample_seed,
        "counts": {"prompts": len(texts), "passed": len(passed), "kept": len(kept),
                   "truncated": reasons[TRUNCATED]},
        "pass_rate": rate,
        "reject_reasons": {r: reasons[r] for r in (TRUNCATED, *REASONS) if reasons[r]},
        "generated_tokens": sum(table["tokens"]), "sampling_seconds": seconds,
    }
    columns = {name: [table[name][r] for r in kept] for name in ("prompt", "completion", "prompt_index")}
    write_pairs(out, columns, metadata)
    say(f"{len(passed)} of {len(texts)} passed ({rate:.1%}); kept {len(kept)} -> {out}")
    return out
