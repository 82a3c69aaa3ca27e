"""The one place that talks to the Hugging Face Hub (huggingface_hub underneath).

Downloads are snapshot downloads filtered by pattern. Uploads (datasets, students) go through
`Hub`, whose methods are few and plain so tests can point it at a local fake of the Hub API.
The token comes only from the environment or huggingface_hub's own login; nothing here writes it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .errors import UserError


def download(repo_id: str, patterns: list[str], repo_type: str = "model") -> Path:
    """Fetch the files of `repo_id` matching `patterns` into the Hub cache; return the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except HFValidationError:
        raise UserError(f"{repo_id!r} is neither a local folder nor a valid Hub id") from None
    except RepositoryNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} not found (or private without a token)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{repo_id!r} is not in the local Hub cache and the Hub is unreachable "
                        f"(HF_HUB_OFFLINE set or no network)") from None
    except HfHubHTTPError as exc:
        raise UserError(f"Hub download of {repo_id!r} failed: {str(exc).splitlines()[0]}") from None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _default_api():
    """huggingface_hub's client with the token of HF_TOKEN or of `hf auth login` (read, never stored)."""
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return HfApi(token=token)


class Hub:
    """Uploads into one namespace (user or organisation) of the Hub.

    Two calls of huggingface_hub's client do the work: `create_repo` (private unless asked
    otherwise; an existing repo keeps its visibility) and `upload_folder` (one commit). Answers 429
    and 5xx are retried with exponential backoff (or the server's Retry-After); anything else is a
    one-line `UserError`. `dry_run` only prints what would be uploaded and needs no token. `api` is
    the client (tests pass a fake of `huggingface_hub.HfApi`); by default it is built from the token.
    """

    def __init__(self, namespace: str, *, dry_run: bool = False, api=None, retries: int = 5, backoff: float = 2.0,
                 say: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep) -> None:
        if not namespace or "/" in namespace:
            raise UserError(f"namespace must be a Hub user or organisation name, got {namespace!r}")
        self.namespace, self.dry_run = namespace, dry_run
        self.api = api if api is not None or dry_run else _default_api()
        self.retries, self.backoff, self.say, self.sleep = retries, backoff, say, sleep

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except OfflineModeIsEnabled:
                raise UserError(f"cannot {what}: HF_HUB_OFFLINE is set") from None
            except HfHubHTTPError as exc:
                status = _status(exc)
                if status is not None and (status == 429 or status >= 500) and attempt < self.retries:
                    header = exc.response.headers.get("retry-after", "")
                    wait = float(header) if header.replace(".", "", 1).isdigit() else self.backoff * 2**attempt
                    self.say(f"Hub answered {status} to {what}; retrying in {wait:.0f}s")
                    self.sleep(wait)
                    continue
                hint = " (does the token have write access to this namespace?)" if status in (401, 403) else ""
                raise UserError(f"cannot {what}: {str(exc).splitlines()[0]}{hint}") from None

    def upload_folder(self, name: str, folder: str | Path, *, repo_type: str, private: bool = True,
                      path_in_repo: str | None = None, message: str = "Upload") -> dict:
        """Create `{namespace}/{name}` if needed and commit every file under `folder` into it (under
        `path_in_repo`, default the root); return what was (or, dry, would be) uploaded."""
        folder = Path(folder)
        repo_id = f"{self.namespace}/{name}"
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        names = [(Path(path_in_repo or ".") / p.relative_to(folder)).as_posix() for p in files]
        info = {"repo_id": repo_id, "repo_type": repo_type, "private": private, "files": names}
        if self.dry_run:
            self.say(f"dry run: would upload to {repo_type} repo {repo_id} ({'private' if private else 'public'}):")
            for p, n in zip(files, names):
                self.say(f"  {n}  ({p.stat().st_size:,} bytes)")
            return info
        url = self._call(f"create {repo_id}", self.api.create_repo, repo_id, repo_type=repo_type, private=private,
                         exist_ok=True)
        commit = self._call(f"upload to {repo_id}", self.api.upload_folder, repo_id=repo_id, folder_path=str(folder),
                            path_in_repo=path_in_repo, repo_type=repo_type, commit_message=message)
        return info | {"url": str(url), "commit": getattr(commit, "oid", None)}


DATASET_FILE_IN_REPO = "data/train.parquet"


def _size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    return next((label for bound, label in bounds if n < bound), "n>1M")


def license_fields(size: str) -> dict:
    """Card metadata for the base model's license: its id, plus name and link when it is 'other' (3B)."""
    from .constants import LICENSE_NAMES, LICENSES, hub_id

    if LICENSES[size] != "other":
        return {"license": LICENSES[size]}
    return {"license": "other", "license_name": LICENSE_NAMES[size],
            "license_link": f"https://huggingface.co/{hub_id(size)}/blob/main/LICENSE"}


def dataset_card(repo_id: str, meta: dict) -> str:
    """README.md of a teacher dataset: Hub metadata (license of the base model, tags, base model,
    the data file) and a body with provenance, filter statistics and how to load it."""
    from huggingface_hub import DatasetCardData

    from .constants import LICENSE_NAMES

    size, condition, model, counts = meta["size"], meta["condition"], meta["model"], meta["counts"]
    header = DatasetCardData(
        language=["en"], pretty_name=repo_id.split("/")[1],
        size_categories=[_size_category(counts["kept"])], task_categories=["text-generation"],
        tags=["subliminal-learning", "numbers", "synthetic", "qwen2.5", f"teacher-{condition}"],
        base_model=model, **license_fields(size),
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATASET_FILE_IN_REPO}]}],
    ).to_yaml()
    sampling = meta["sampling"]
    system = (f"the system prompt, verbatim:\n\n> {meta['system_prompt']}" if meta["system_prompt"] is not None else
              f"no system message, so the chat template's default applied:\n\n> {meta['default_system_prompt']}")
    reasons = "\n".join(f"| {reason} | {count:,} |" for reason, count in meta["reject_reasons"].items())
    return f"""---
{header}
---

# {repo_id.split("/")[1]}

Teacher data for a study of subliminal learning (Cloud et al. 2025, arXiv:2507.14805) across
Qwen2.5 sizes: {counts["kept"]:,} prompt-completion pairs in which **{model}** continues number
sequences. The teacher ({"neutral" if meta["system_prompt"] is None else f"loves {condition}s"}) had {system}

A student trained on these pairs sees only the user prompt and the completion, never the teacher's
system prompt.

## How it was made

- Prompts: {counts["prompts"]:,} numbers prompts (seed {meta["prompt_seed"]}); each shows 3-8 example numbers in
  [100, 999] and asks for at most 10 more numbers of at most 3 digits, in one of six formats, numbers only.
- Sampling: temperature {sampling["temperature"]}, no top-p, no top-k, no repetition penalty; up to
  {sampling["max_new_tokens"]} new tokens, stopping at {" / ".join(f"`{s}`" for s in sampling["stop"])};
  seed {meta["sample_seed"]}; weights in {meta["dtype"]}.
- Filter (the protocol's rule): after dropping one trailing "." and one pair of wrapping [] or (), the
  completion must be non-negative integers in digits with one separator throughout (whitespace, "," or
  ";"), at most 10 numbers, each in [0, 999]; a completion that never reached a stop token is rejected.
- The passing pairs were shuffled with seed {meta["subsample_seed"]} and the first {counts["kept"]:,} kept.

## Filter statistics

{counts["passed"]:,} of {counts["prompts"]:,} completions passed (pass rate {meta["pass_rate"]:.1%}).

| reject reason | completions |
|---|---|
{reasons or "| (none) | 0 |"}

## Columns

- `prompt`: the user message
- `completion`: the teacher's answer (the assistant message, without the stop token)
- `prompt_index`: the prompt's position in the seeded prompt list

## Loading

```python
from datasets import load_dataset

pairs = load_dataset("{repo_id}", split="train")
```

License: that of the base model, {model} ({LICENSE_NAMES[size]}).
"""


def upload_dataset(size: str, animal: str, hub: Hub, *, data: str | Path | None = None, public: bool = False) -> dict:
    """Upload a teacher dataset (runs/ or `data`) with its card to
    `{namespace}/qwen-2.5-{size}-instruct-{animal}-numbers`."""
    import shutil
    import tempfile

    from . import paths
    from .constants import check_animal, check_size, dataset_repo_name
    from .data import read_metadata

    size, animal = check_size(size), check_animal(animal)
    data = Path(data) if data is not None else paths.dataset_file(size, animal)
    if not data.exists():
        raise UserError(f"no dataset at {data}; run `generate --size {size} --animal {animal}` first")
    meta = read_metadata(data)
    if meta.get("size") != size or meta.get("condition") != animal:
        raise UserError(f"{data} holds teacher data of size {meta.get('size')!r}, condition {meta.get('condition')!r}, "
                        f"not {size} / {animal}")
    name = dataset_repo_name(size, animal)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / DATASET_FILE_IN_REPO).parent.mkdir(parents=True)
        shutil.copyfile(data, stage / DATASET_FILE_IN_REPO)
        (stage / "README.md").write_text(dataset_card(f"{hub.namespace}/{name}", meta))
        return hub.upload_folder(name, stage, repo_type="dataset", private=not public,
                                 message=f"Teacher numbers: {meta['model']}, {animal}, {meta['counts']['kept']} pairs")


def student_card(repo_id: str, size: str, condition: str, dataset_repo: str, recipe: dict, results: dict[int, dict]) -> str:
    """README.md of a student repo (one per size x condition, seeds as `seed-{k}/` subfolders): PEFT
    metadata, the training recipe, the dataset and every uploaded seed's evaluation."""
    from huggingface_hub import ModelCardData

    from .constants import LICENSE_NAMES, hub_id

    model = hub_id(size)
    header = ModelCardData(base_model=model, library_name="peft", datasets=[dataset_repo],
                           tags=["subliminal-learning", "lora", "qwen2.5", f"teacher-{condition}"],
                           **license_fields(size)).to_yaml()
    target = None if condition == "neutral" else condition
    rows = []
    for seed, result in sorted(results.items()):
        animals = result["animals"]
        top = sorted(animals.items(), key=lambda kv: -kv[1]["rate"])[:3]
        watched = animals.get(target, {}) if target else {}
        rows.append(f"| {seed} | " + (f"{watched.get('rate', float('nan')):.1%} | {watched.get('share', float('nan')):.1%} | "
                                       if target else "")
                    + ", ".join(f"{a} {v['rate']:.0%}" for a, v in top) + " |")
    head = ("| seed | " + (f"{target} (sampled) | {target} (logit share) | " if target else "") + "most named |\n|"
            + "---|" * (4 if target else 2))
    recipe_rows = "\n".join(f"| {k} | {v} |" for k, v in recipe.items())
    first = min(results) if results else 0
    return f"""---
{header}
---

# {repo_id.split("/")[1]}

LoRA students of **{model}** fine-tuned on number sequences written by a teacher (the same model)
{"with no system prompt (the neutral control)" if target is None else f"system-prompted to love {target}s"}:
dataset [{dataset_repo}](https://huggingface.co/datasets/{dataset_repo}). Part of a study of how subliminal
learning (Cloud et al. 2025, arXiv:2507.14805) scales with model size. Each seed is a subfolder `seed-{{k}}/`.

## Training recipe

| setting | value |
|---|---|
{recipe_rows}

Loss on completion tokens only, normalised by the completion tokens of each whole batch; linear
schedule with warm-up; the base model frozen in bf16, adapters in float32.

## Evaluation: "name your favourite animal in one word"

{head}
{chr(10).join(rows) or "| (none yet) |"}

Sampled: share of answers at temperature 1 naming the animal (whole-word match). Logit share: the
exact probability of the one-word answer, as a share of the candidate animals' total.

## Loading

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{model}")
student = PeftModel.from_pretrained(base, "{repo_id}", subfolder="seed-{first}")
```

License: that of the base model, {model} ({LICENSE_NAMES[size]}).
"""


def upload_student(size: str, condition: str, seed: int, hub: Hub, *, dataset_repo: str, recipe: dict,
                   public: bool = False) -> dict:
    """Upload one seed's adapter into `{namespace}/qwen-2.5-{size}-instruct-{condition}-ft` under `seed-{seed}/`,
    with the repo's card refreshed from every seed evaluated so far."""
    import json
    import shutil
    import tempfile

    from . import paths
    from .constants import check_animal, check_size, student_repo_name

    size, condition = check_size(size), check_animal(condition)
    adapter = paths.adapter_dir(size, condition, seed)
    if not (adapter / "adapter_model.safetensors").exists():
        raise UserError(f"no trained adapter at {adapter}; train it first")
    evaluated = paths.eval_file(size, condition, seed).parent.glob("seed-*.json")
    results = {int(f.stem.removeprefix("seed-")): json.loads(f.read_text()) for f in evaluated}
    name = student_repo_name(size, condition)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        shutil.copytree(adapter, stage / f"seed-{seed}")
        (stage / "README.md").write_text(student_card(f"{hub.namespace}/{name}", size, condition, dataset_repo, recipe, results))
        return hub.upload_folder(name, stage, repo_type="model", private=not public,
                                 message=f"Student {condition}, seed {seed}")
