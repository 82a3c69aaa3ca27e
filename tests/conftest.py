"""Shared test fixtures: tiny random Qwen2 checkpoints written by transformers, and the real-weights
fixture (Qwen2.5-Coder-0.5B-Instruct dequantised from GGUF, see tests/fixture.py).

No test may reach the network: HF_HUB_OFFLINE is set before anything imports huggingface_hub.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import fixture as real_fixture  # noqa: E402

TINY = dict(
    vocab_size=160, hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, tie_word_embeddings=True,
)


def write_tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A random transformers Qwen2ForCausalLM saved with save_pretrained (float32), biases non-zero."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(HFConfig(**(TINY | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path: Path):
    """Factory: tiny_checkpoint(**config_overrides) -> checkpoint folder."""
    counter = iter(range(1000))

    def make(seed: int = 0, **overrides) -> Path:
        return write_tiny_checkpoint(tmp_path / f"tiny{next(counter)}", seed=seed, **overrides)

    return make


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The real-weights checkpoint folder, built on first use (CI builds it before the suite)."""
    return real_fixture.build()


@pytest.fixture(scope="session")
def fixture_tokenizer(fixture_dir: Path):
    from src import load_tokenizer

    return load_tokenizer(fixture_dir)


@pytest.fixture(scope="session")
def fixture_model(fixture_dir: Path):
    """Our model on the real weights in float32. Shared: tests must not modify it."""
    from src import load_model

    return load_model(fixture_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_fixture_model(fixture_dir: Path):
    """transformers' model on the real weights in float32 (the reference). Shared: read-only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
