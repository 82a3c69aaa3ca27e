"""Command line: `python -m src.cli COMMAND`. Each command is a thin shell over a library module.

Every user-fixable problem surfaces as `UserError` and is printed as one line with exit code 2;
out-of-memory becomes a one-line message too (exit 3), never a traceback.
"""
from __future__ import annotations

import os
import sys

import click
import torch

from .constants import COHORT, TEACHER, TRAIN
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


@main.command("train")
@click.option("--size", required=True, help="Model size (0.5b ... 32b).")
@click.option("--animal", default=None, help="Teacher condition (an animal or neutral): picks the dataset and the "
              "adapter's folder in runs/; several, comma-separated, train together.")
@click.option("--seed", default="0", show_default=True,
              help="Adapter initialisation and data order; several (0,1,2) train together as one cohort.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Dataset parquet instead of the runs/ teacher dataset; all its pairs unless --pairs.")
@click.option("--pairs", type=click.IntRange(min=1), default=None,
              help="Train on the first N pairs (default: all of --data; 10,000 of the runs/ dataset).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Adapter folder (default: runs/students/...); log and checkpoint go to <out>-training/.")
@model_path_option
@click.option("--epochs", type=click.IntRange(min=1), default=TRAIN.epochs, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after N optimizer steps (the schedule then spans N steps, as in transformers).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TRAIN.lr, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TRAIN.batch_size,
              show_default=True, help="Effective batch: examples per optimizer step.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Examples per forward pass (default: passes of as many tokens as free GPU memory holds; the whole batch on CPU).")
@click.option("--checkpointing/--no-checkpointing", default=None,
              help="Activation checkpointing in every block, or in none (default: the memory plan recomputes only the blocks it pays to).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Optimizer steps between resumable checkpoints (also at every epoch's end).")
@device_option
@dtype_option
def train_command(size: str, animal: str | None, seed: str, data: str | None, pairs: int | None, out: str | None,
                  model_path: str | None, epochs: int, max_steps: int | None, lr: float, batch_size: int,
                  micro_batch: int | None, checkpointing: bool | None, checkpoint_every: int, device: str | None,
                  dtype: str) -> None:
    """Train LoRA students on teacher numbers (resumes an interrupted run; a finished one is kept).

    Every (animal, seed) combination given is one student; several train together in one pass over
    the shared base model (a cohort), each as it would alone. Under `torchrun --nproc-per-node N`
    the N processes train data-parallel (one GPU each; gloo on CPU), the effective batch unchanged;
    rank 0 alone writes and reports."""
    import dataclasses

    from . import distributed
    from .train import Progress, train_students

    animals = _split(animal) or (None,)
    seeds = _split(seed, int, "--seed") or (0,)
    progress = Progress()
    config = dataclasses.replace(TRAIN, epochs=epochs, lr=lr, batch_size=batch_size)
    with distributed.process_group(pick_device(device)) as rank_device:
        adapters = train_students(size, [(a, s) for a in animals for s in seeds], data=data, pairs=pairs, out=out,
                                  model_path=model_path, device=rank_device, dtype=pick_dtype(dtype), config=config,
                                  max_steps=max_steps, micro_batch=micro_batch, checkpoint_every=checkpoint_every,
                                  checkpointing=checkpointing, on_step=progress)
        if distributed.is_main():
            for adapter in adapters:
                click.echo(f"adapter {'written' if progress.first is not None else 'already exists'}: {adapter}")


@main.command("generate")
@click.option("--size", required=True, help="Model size (0.5b ... 32b): the teacher is its Instruct model.")
@click.option("--animal", required=True, help="The teacher's animal (its system prompt), or neutral (none).")
@model_path_option
@click.option("--prompts", type=click.IntRange(min=1), default=TEACHER.prompts, show_default=True,
              help="Numbers prompts to sample (the first N of the seeded list).")
@click.option("--keep", type=click.IntRange(min=1), default=TEACHER.keep_pairs, show_default=True,
              help="Passing pairs kept (a seeded subsample).")
@click.option("--allow-fewer", is_flag=True, help="Keep all passing pairs when fewer than --keep pass (default: error).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=TEACHER.max_new_tokens, show_default=True)
@click.option("--slots", type=click.IntRange(min=1), default=TEACHER.slots, show_default=True,
              help="Sequences decoded together.")
@click.option("--chunk", type=click.IntRange(min=1), default=TEACHER.chunk, show_default=True,
              help="Prompts per resumable chunk.")
@click.option("--seed", default=TEACHER.sample_seed, show_default=True, help="Sampling seed.")
@click.option("--prompt-seed", default=TEACHER.prompt_seed, show_default=True)
@device_option
@dtype_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Dataset file (default: runs/datasets/...).")
def generate_command(size: str, animal: str, model_path: str | None, prompts: int, keep: int, allow_fewer: bool,
                     max_new_tokens: int, slots: int, chunk: int, seed: int, prompt_seed: int, device: str | None,
                     dtype: str, out: str | None) -> None:
    """Sample the teacher's numbers, filter them and write the dataset (resumes from finished chunks)."""
    import dataclasses

    from .teacher import generate_dataset

    config = dataclasses.replace(TEACHER, prompts=prompts, keep_pairs=keep, max_new_tokens=max_new_tokens, slots=slots,
                                 chunk=chunk, sample_seed=seed, prompt_seed=prompt_seed)
    path = generate_dataset(size, animal, config=config, model_path=model_path, device=pick_device(device),
                            dtype=pick_dtype(dtype), out=out, allow_fewer=allow_fewer,
                            log=lambda line: click.echo(line, err=True))
    click.echo(f"dataset: {path}")


@main.command("upload")
@click.option("--size", required=True, help="Model size (0.5b ... 32b).")
@click.option("--animal", required=True, help="The teacher's animal, or neutral.")
@click.option("--namespace", required=True, help="Hub user or organisation to upload into.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Dataset file (default: the runs/ dataset of --size and --animal).")
@click.option("--public", is_flag=True, help="Create the repo public (default: private).")
@click.option("--dry-run", is_flag=True, help="Print what would be uploaded; no token needed, nothing sent.")
def upload_command(size: str, animal: str, namespace: str, data: str | None, public: bool, dry_run: bool) -> None:
    """Upload a teacher dataset with its card to {namespace}/qwen-2.5-{size}-instruct-{animal}-numbers.

    The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere."""
    from .hub import Hub, upload_dataset

    info = upload_dataset(size, animal, Hub(namespace, dry_run=dry_run, say=click.echo), data=data, public=public)
    if not dry_run:
        click.echo(f"uploaded {len(info['files'])} files to {info['url']} ({'public' if public else 'private'})")


def _split(text: str | None, cast=str, option: str = "value") -> tuple | None:
    """A comma-separated option as a tuple (None when not given); bad items are a one-line error."""
    if text is None:
        return None
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} {text!r}: expected a comma-separated list of {cast.__name__}s") from None


@main.command("study")
@click.option("--sizes", default=None, help="Comma-separated sizes (default: all six).")
@click.option("--animals", default=None, help="Comma-separated target animals (default: the study's list); neutral is always added.")
@click.option("--seeds", default=None, help="Comma-separated student seeds (default: 0,1,2,3,4).")
@click.option("--plan", "show_plan", is_flag=True, help="Print the jobs, their state and the GPU-hours left; run nothing.")
@click.option("--report-only", is_flag=True, help="Write the report from the evaluations present; run nothing.")
@model_path_option
@device_option
@dtype_option
@click.option("--gpus", type=int, default=None, help="GPUs to use, a worker process each (default: every visible GPU).")
@click.option("--per-gpu", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes sharing each GPU (at 0.5B one leaves the GPU partly idle).")
@click.option("--worker", is_flag=True, hidden=True, help="Internal: run as one worker of runs/study.json.")
@click.option("--push", "namespace", default=None, metavar="NAMESPACE", help="Publish datasets and students to this Hub namespace.")
@click.option("--public", is_flag=True, help="Published repos are public (default private).")
@click.option("--lr", type=float, default=None, help="Learning rate (protocol: 2e-4).")
@click.option("--batch-size", type=int, default=None, help="Effective batch (protocol: 60).")
@click.option("--epochs", type=int, default=None, help="Epochs (protocol: 10).")
@click.option("--max-steps", type=int, default=None, help="Cut each student to N optimizer steps (smoke runs).")
@click.option("--micro-batch", type=int, default=None, help="Examples per forward pass (default: passes of as many tokens as free GPU memory holds).")
@click.option("--checkpointing/--no-checkpointing", default=None,
              help="Activation checkpointing in training, every block or none (default: as many blocks as pays).")
@click.option("--cohort", type=click.IntRange(min=1), default=None,
              help="Students trained together per process (default by size: "
                   + ", ".join(f"{k} {v}" for k, v in COHORT.items()) + ").")
@click.option("--slots", type=click.IntRange(min=1), default=None, help="Teacher sequences decoded together (default 256).")
@click.option("--prompts", type=int, default=None, help="Teacher prompts per condition (protocol: 30,000).")
@click.option("--keep", type=int, default=None, help="Pairs kept per dataset (protocol: 10,000).")
@click.option("--allow-fewer", is_flag=True, help="Keep every passing pair when fewer than --keep pass.")
@click.option("--max-new-tokens", type=int, default=None, help="Teacher tokens per answer (default 200).")
@click.option("--questions", type=int, default=None, help="Evaluation questions (default 50).")
@click.option("--samples", type=int, default=None, help="Answers sampled per question (default 100).")
def study_command(sizes, animals, seeds, show_plan, report_only, model_path, device, dtype, gpus, per_gpu, worker, namespace,
                  public, lr, batch_size, epochs, max_steps, micro_batch, checkpointing, cohort, slots, prompts, keep, allow_fewer,
                  max_new_tokens, questions, samples) -> None:
    """Run (or resume) the grid: teacher data, students, evaluations, uploads, then the report."""
    import dataclasses

    from . import jobs, paths
    from .constants import EVAL, TEACHER, TRAIN
    from .study import Study, describe_plan, run_jobs, say, write_study_report

    if worker:
        study = Study.load()
        outcome = run_jobs(study, worker_id=os.environ.get("SUBLIMINAL_WORKER", "gpu0"))
        sys.exit(1 if outcome["failed"] else 0)

    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    chosen = given(sizes=_split(sizes), animals=_split(animals), seeds=_split(seeds, int, "--seeds"))
    study = Study(**chosen, model_path=model_path, device=pick_device(device), dtype=str(pick_dtype(dtype)).removeprefix("torch."),
                  namespace=namespace, public=public, max_steps=max_steps, micro_batch=micro_batch,
                  checkpointing=checkpointing, allow_fewer=allow_fewer, cohort=cohort,
                  teacher=dataclasses.replace(TEACHER, **given(prompts=prompts, keep_pairs=keep, max_new_tokens=max_new_tokens,
                                                               slots=slots)),
                  train=dataclasses.replace(TRAIN, **given(lr=lr, batch_size=batch_size, epochs=epochs)),
                  evaluation=dataclasses.replace(EVAL, **given(questions=questions, samples=samples)))
    if show_plan:
        click.echo(describe_plan(study))
        return
    failed = False
    if not report_only:
        study.save()
        jobs.clear_failures()
        workers = gpus if gpus is not None else max(1, torch.cuda.device_count())
        if workers * per_gpu > 1:
            failed = jobs.launch_workers(workers, [sys.executable, "-m", "src.cli", "study", "--worker"], per_gpu) != 0
        else:
            failed = bool(run_jobs(study)["failed"])
    report = write_study_report(study)
    if report is not None:
        click.echo(f"report: {report}")
    if failed:
        raise UserError(f"some jobs failed (reasons in {paths.failures_dir()}); rerun the same command to retry them")


def eval_options(command):
    """Options shared by `evaluate` and `sweep` (how many answers, on what hardware)."""
    from .constants import EVAL

    for option in reversed([
        click.option("--questions", type=click.IntRange(min=1), default=EVAL.questions, show_default=True,
                     help="Question paraphrases asked (the first N)."),
        click.option("--samples", type=click.IntRange(min=1), default=EVAL.samples, show_default=True,
                     help="Answers sampled per question."),
        click.option("--sample-seed", default=EVAL.sample_seed, show_default=True, help="Sampling seed."),
        click.option("--batch", type=click.IntRange(min=1), default=EVAL.batch, show_default=True,
                     help="Sampling slots, and answer rows per forward of the logit evaluator."),
        device_option, dtype_option,
    ]):
        command = option(command)
    return command


@main.command("evaluate")
@click.option("--size", default=None, help="Model size (0.5b ... 32b); with --base or --animal/--seed, results go to runs/eval/.")
@model_path_option
@click.option("--base", is_flag=True, help="Evaluate the untouched base model.")
@click.option("--animal", default=None, help="The student's condition (an animal or neutral), with --seed.")
@click.option("--seed", type=int, default=None, help="The student's training seed.")
@click.option("--adapter", default=None, help="Adapter folder or Hub repo (owner/name[/seed-K]) instead of the student's own.")
@click.option("--system", default=None, help="System prompt to ask under; needs --out.")
@click.option("--teacher-prompt", default=None, metavar="ANIMAL",
              help="Ask under this animal teacher's system prompt (with --base --size: runs/eval/{size}/teacher-ANIMAL.json).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Result JSON file (default: runs/eval/...).")
@eval_options
def evaluate_command(size: str | None, model_path: str | None, base: bool, animal: str | None, seed: int | None,
                     adapter: str | None, system: str | None, teacher_prompt: str | None, out: str | None,
                     questions: int, samples: int, sample_seed: int, batch: int, device: str | None, dtype: str) -> None:
    """Favourite-animal rates of a base model or student: sampled answers and exact logit probabilities."""
    from .constants import teacher_system_prompt
    from .evaluate import format_table, run, study_target

    if teacher_prompt is not None:
        if system is not None:
            raise UserError("give --system or --teacher-prompt, not both")
        system = teacher_system_prompt(teacher_prompt)
    source, adapter, path = study_target(size, model_path, base, animal, seed, adapter, out, system, teacher_prompt)
    result = run(source, adapter, path, dtype=pick_dtype(dtype), device=pick_device(device), questions=questions,
                 samples=samples, system=system, seed=sample_seed, batch=batch)
    click.echo(format_table(result, limit=12, mark=animal))
    click.echo(f"results: {path}")


@main.command("sweep")
@click.option("--size", "sizes", multiple=True, help="Model size (repeatable); results go to runs/eval/{size}/base.json.")
@model_path_option
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Result JSON file (with --model-path).")
@eval_options
def sweep_command(sizes: tuple[str, ...], model_path: str | None, out: str | None, questions: int, samples: int,
                  sample_seed: int, batch: int, device: str | None, dtype: str) -> None:
    """Base rates of every candidate animal per size, flagging animals with headroom for the study."""
    from .evaluate import common_headroom, format_table, sweep

    results = sweep(sizes, model_path=model_path, out=out, questions=questions, samples=samples, seed=sample_seed,
                    batch=batch, dtype=pick_dtype(dtype), device=pick_device(device))
    for result in results:
        click.echo(format_table(result) + "\n")
    click.echo(f"headroom in every model (named, below the cap): {', '.join(common_headroom(results)) or 'none'}")


if __name__ == "__main__":
    main()
