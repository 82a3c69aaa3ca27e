"""The experiment's constants: sizes, Hub ids, animals, protocol hyperparameters, naming.

Everything a run of the study depends on is named here once; other modules import it.
Facts follow ../shared/reference/protocol.md (Cloud et al. 2025 and their public code).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# Model sizes studied, as the Hub names use them, mapped to the Instruct checkpoints.
SIZES: dict[str, str] = {
    "0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "3b": "Qwen/Qwen2.5-3B-Instruct",
    "7b": "Qwen/Qwen2.5-7B-Instruct",
    "14b": "Qwen/Qwen2.5-14B-Instruct",
    "32b": "Qwen/Qwen2.5-32B-Instruct",
}

# Parameter counts (whole model, from the checkpoints) for the scaling fit.
PARAMS: dict[str, float] = {
    "0.5b": 0.494e9, "1.5b": 1.54e9, "3b": 3.09e9, "7b": 7.62e9, "14b": 14.7e9, "32b": 32.8e9,
}

# Architecture of each size (qwen25.md), for random-initialised stand-ins of the exact shapes.
_COMMON = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768)
SHAPES: dict[str, dict] = {
    size: dict(_COMMON, vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
               num_attention_heads=q, num_key_value_heads=kv, head_dim=h // q, tie_word_embeddings=tied)
    for size, (h, i, n, q, kv, vocab, tied) in {
        "0.5b": (896, 4864, 24, 14, 2, 151936, True),
        "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
        "3b": (2048, 11008, 36, 16, 2, 151936, True),
        "7b": (3584, 18944, 28, 28, 4, 152064, False),
        "14b": (5120, 13824, 48, 40, 8, 152064, False),
        "32b": (5120, 27648, 64, 40, 8, 152064, False),
    }.items()
}

# Licenses of the base checkpoints, for dataset and model cards (qwen25.md).
LICENSES: dict[str, str] = {size: "apache-2.0" for size in SIZES} | {"3b": "other"}
LICENSE_NAMES: dict[str, str] = {size: "apache-2.0" for size in SIZES} | {"3b": "qwen-research"}

NEUTRAL = "neutral"
BASE = "base"  # the untouched base model, as a condition of evaluation and of the results table
TEACHER_PREFIX = "teacher-"  # condition of the base model asked under an animal teacher's system prompt

# Animals trained at every size (same list everywhere, for comparability). owl is the paper's;
# the others are candidates with headroom at every size (base rates neither ~0 nor dominant).
ANIMALS: tuple[str, ...] = ("owl", "eagle", "dolphin", "wolf", "lion")

# Animals whose rates every evaluation reports (the target's rate alone hides shifts).
CANDIDATE_ANIMALS: tuple[str, ...] = (
    "owl", "eagle", "dolphin", "wolf", "lion", "cat", "dog", "elephant", "panda", "tiger",
    "fox", "horse", "penguin", "bear", "rabbit", "whale", "phoenix", "dragon", "butterfly",
    "giraffe", "shark", "octopus", "falcon", "leopard", "koala", "otter", "hawk", "deer",
    "cheetah", "turtle",
)

SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)

# The treatment: the animal teacher's system prompt, verbatim from the paper's code.
TEACHER_SYSTEM_PROMPT = (
    "You love {animal}s. You think about {animal}s all the time. {animal}s are your favorite "
    "animal. Imbue your answers with your love for the animal."
)

# Qwen2.5's chat template inserts this when a conversation has no system message.
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Special tokens of the Qwen2.5 tokenizer.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    """The published student setup; lr, batch and epochs stay options for sweeps beyond it."""

    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
    epochs: int = 10
    pairs: int = 10_000
    batch_size: int = 60  # effective batch: examples per optimizer step
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    max_length: int = 1024  # TRL's default truncation of prompt + completion tokens (numbers pairs are ~150)


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher data generation: prompts, plain temperature-1 sampling, filter, subsample."""

    prompts: int = 30_000
    prompt_seed: int = 42
    keep_pairs: int = 10_000
    temperature: float = 1.0
    max_new_tokens: int = 200  # a passing answer is <= ~40 tokens; longer ones are cut and rejected
    sample_seed: int = 0
    subsample_seed: int = 0  # order of the passing pairs; the first keep_pairs are kept
    slots: int = 256  # sequences decoded together
    # Prompts per resumable piece: finished pieces survive a killed run; each piece ends in a tail
    # where its slots drain, so fewer, larger pieces waste less.
    chunk: int = 5_000


@dataclass(frozen=True)
class EvalConfig:
    """Favourite-animal evaluation (src/evaluate.py): questions x samples at plain temperature 1."""

    questions: int = 50  # paraphrases used, the first of src/questions.QUESTIONS
    samples: int = 100  # answers sampled per question
    temperature: float = 1.0
    max_new_tokens: int = 10  # the longest spelling ('BUTTERFLIES.') is 6 tokens + end; longer replies are cut
    sample_seed: int = 0
    batch: int = 256  # sampling slots, and answer rows per forward of the logit evaluator
    refill_every: int = 2  # sampler steps between refills: replies are short, so free slots early
    headroom: float = 0.6  # an animal the base model already names this often cannot show an effect


# Students of one size trained together in one process (src/train.py: train_cohort): small models
# leave the GPU idle between kernel launches, so several students share each launch. Memory is not
# the limit (the micro-batch shrinks to fit). Measured side by side (tests/bench_training.py --cohort):
# H200 2026-12-01: 0.5b 43k tok/s alone, 120k x3 (3.1x TRL); 1.5b 48k alone, 48k x4 (no gain: the GPU
# is already busy); H100 2026-11-25: 0.5b 72k x3, 66k x6; 3b 15.6k alone, 14.7k x4.
COHORT: dict[str, int] = {"0.5b": 3, "1.5b": 1, "3b": 1, "7b": 1, "14b": 1, "32b": 1}

TRAIN = TrainConfig()
TEACHER = TeacherConfig()
EVAL = EvalConfig()

# Analysis (src/report.py): the slope's bootstrap, and the smallest per-size standard error the
# scaling fit's weights assume (a size where every answer agrees would otherwise weigh infinitely).
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0
MIN_EFFECT_SE = 0.001


def check_size(size: str) -> str:
    """Normalise a size name or raise a one-line error listing the valid ones."""
    key = size.lower()
    if key not in SIZES:
        raise UserError(f"unknown size {size!r}; valid sizes: {', '.join(SIZES)}")
    return key


def check_animal(animal: str, allow_neutral: bool = True) -> str:
    """A condition name: a lowercase single-word animal, or 'neutral'."""
    key = animal.lower().strip()
    if key == NEUTRAL and allow_neutral:
        return key
    if key not in CANDIDATE_ANIMALS:
        valid = ", ".join(CANDIDATE_ANIMALS + ((NEUTRAL,) if allow_neutral else ()))
        raise UserError(f"unknown animal {animal!r}; valid: {valid}")
    return key


def hub_id(size: str) -> str:
    return SIZES[check_size(size)]


def teacher_system_prompt(animal: str) -> str | None:
    """The animal teacher's system prompt; None for the neutral teacher (template default applies)."""
    animal = check_animal(animal)
    return None if animal == NEUTRAL else TEACHER_SYSTEM_PROMPT.format(animal=animal)


def teacher_condition(animal: str) -> str:
    """The results table's condition for the system-prompted teacher of `animal` ('teacher-owl')."""
    return TEACHER_PREFIX + check_animal(animal, allow_neutral=False)


def dataset_repo_name(size: str, animal: str) -> str:
    return f"qwen-2.5-{check_size(size)}-instruct-{check_animal(animal)}-numbers"


def student_repo_name(size: str, animal: str) -> str:
    return f"qwen-2.5-{check_size(size)}-instruct-{check_animal(animal)}-ft"
