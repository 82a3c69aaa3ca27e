"""Command line: `python -m src.cli COMMAND`. Each command is a thin shell over a library module.

Every user-fixable problem surfaces as `UserError` and is printed as one line with exit code 2;
out-of-memory becomes a one-line message too (exit 3), never a traceback.
"""
from __future__ import annotations

import sys

import click
import torch

from .errors import UserError


class Group(click.Group):
    """Turns library errors into one-line messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except torch.OutOfMemoryError:
            click.echo("error: out of GPU memory; lower --micro-batch/--slots or use a larger GPU "
                       "(finished work and checkpoints are kept)", err=True)
            sys.exit(3)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Subliminal learning across Qwen2.5 sizes: teacher data, students, evaluation, study."""


def pick_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]


model_path_option = click.option("--model-path", type=click.Path(file_okay=False), default=None,
                                 help="Local checkpoint folder instead of the size's Hub checkpoint.")
device_option = click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
dtype_option = click.option("--dtype", type=click.Choice(["bf16", "fp32", "fp16"]), default="bf16", show_default=True)


@main.command()
@click.option("--size", default="0.5b", show_default=True, help="Model size (0.5b ... 32b).")
@model_path_option
@click.option("--prompt", default="Name your favorite animal using only one word.", show_default=True)
@click.option("--system", default=None, help="System prompt (default: the template's).")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy.")
@click.option("--seed", default=0, show_default=True)
@device_option
@dtype_option
def chat(size: str, model_path: str | None, prompt: str, system: str | None, max_new_tokens: int,
         temperature: float, seed: int, device: str | None, dtype: str) -> None:
    """Chat-encode one prompt and generate a reply (a smoke test of a checkpoint)."""
    from .checkpoint import load_model
    from .constants import check_size
    from .sampler import sample
    from .tokenizer import load_tokenizer

    source = model_path or check_size(size)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=pick_dtype(dtype), device=pick_device(device))
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.encode_chat(messages)
    out = sample(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                 stop_ids=tokenizer.stop_ids)[0]
    click.echo(f"prompt tokens: {len(ids)}; generated tokens: {len(out)}")
    click.echo(tokenizer.decode(out, skip_special_tokens=True))


if __name__ == "__main__":
    main()
