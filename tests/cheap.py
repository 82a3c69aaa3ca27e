"""Cheap stand-ins for tests: one thread for tiny tensors, a tiny random Qwen2 with the real Qwen2.5
tokenizer, and a sampler that answers from a fixed table (so filter, subsample and metadata can be
checked exactly)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_checkpoint


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine thread hand-offs dominate (15x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# What the fake teacher answers to prompt index i: CANNED[i % len(CANNED)]; None means it never stops.
CANNED: list[str | None] = ["145, 267, 891", "[4, 5, 6]", "I love owls", "1000, 2", "7", None, "1;2;3.", "(1 2)"]
PASSING = {0, 1, 4, 6, 7}  # positions in CANNED that pass the filter (and stop)


def tiny_teacher(folder: Path, fixture_dir: Path) -> Path:
    """A random Qwen2 as wide as Qwen2.5's vocabulary, with the real tokenizer files next to it."""
    write_tiny_checkpoint(folder, seed=1, vocab_size=151936, max_position_embeddings=512)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (fixture_dir / name).exists():
            shutil.copy(fixture_dir / name, folder / name)
    return folder


class CannedSampler:
    """Stands in for src.sampler.Sampler: its samplers answer CANNED by global prompt index and record
    their calls (with the sampler's settings)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[dict] = []

    def __call__(self, model, *, max_new_tokens, temperature, seed, stop_ids, slots):
        settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_ids=tuple(stop_ids),
                        slots=slots)

        def run(prompts, first_index=0):
            self.calls.append(dict(prompts=[list(p) for p in prompts], first_index=first_index, **settings))
            out = []
            for i in range(first_index, first_index + len(prompts)):
                text = CANNED[i % len(CANNED)]
                ids = self.tokenizer.encode(text if text is not None else "1, 2, 3, 4") + [stop_ids[0]]
                out.append(ids if text is not None else ids[:-1])
            return out

        return run
