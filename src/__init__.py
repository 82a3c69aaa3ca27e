"""subliminal-scaling: how subliminal learning scales with model size, in plain PyTorch.

The library surface: load a Qwen2.5 checkpoint and its chat tokenizer, sample from it, build
teacher data (prompts, filter), train LoRA students, evaluate animal preference, plan and report
the study. Each name lives in the module that its concept is named after.
"""
from .checkpoint import load_model, random_model
from .errors import UserError
from .evaluate import animal_probabilities, answer_logprobs, load_evaluated  # evaluate(): src.evaluate.evaluate
from .filter import passes_filter, reject_reason
from .jobs import Job, estimate_hours, launch_workers, plan, run_worker
from .lora import apply_lora, load_adapter, lora_state_dict, remove_lora, save_adapter
from .model import Qwen2, Qwen2Config
from .prompts import numbers_prompts
from .questions import QUESTIONS, classify
from .report import analyse, write_report
from .sampler import Sampler, sample
from .tokenizer import ChatTokenizer, load_tokenizer
from .train import tokenize_pairs, train_students  # the loop itself: src.train.train (no shadowing of the module)

__all__ = ["ChatTokenizer", "Job", "QUESTIONS", "Qwen2", "Qwen2Config", "Sampler", "UserError", "analyse",
           "animal_probabilities", "answer_logprobs", "apply_lora", "classify", "estimate_hours",
           "launch_workers", "load_adapter", "load_evaluated", "load_model", "load_tokenizer",
           "lora_state_dict", "numbers_prompts", "passes_filter", "plan", "random_model",
           "reject_reason", "remove_lora", "run_worker", "sample", "save_adapter", "tokenize_pairs",
           "train_students", "write_report"]
