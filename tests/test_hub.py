"""Hub uploads against a filesystem-backed fake of huggingface_hub.HfApi (HF_HUB_OFFLINE stays set, so
nothing can reach the network): repo ids, repo type, private flag, files, the dataset card's
front-matter, retries on 429/5xx, dry run, and the token's handling."""
from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from src import UserError
from src.cli import main
from src.constants import TEACHER, dataset_repo_name, teacher_system_prompt
from src.data import read_metadata
from src.hub import Hub, dataset_card, upload_dataset
from src.teacher import generate_dataset
from tests.cheap import CannedSampler, one_thread, tiny_teacher  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "hf_fake_token_for_tests_0123456789"


class FakeHfApi:
    """The two HfApi methods the library uses, storing repos under a folder. Every call is checked
    against the real method's signature; `failures` lists HTTP statuses to answer before succeeding."""

    def __init__(self, root: Path, failures: list[int] | None = None, token: str | None = None) -> None:
        self.root, self.failures, self.token = root, list(failures or []), token
        self.calls: list[tuple[str, dict]] = []
        self.repos: dict[str, dict] = {}

    def _enter(self, name: str, *args, **kwargs) -> None:
        bound = inspect.signature(getattr(HfApi, name)).bind(None, *args, **kwargs)  # a real HfApi accepts the call
        self.calls.append((name, bound.arguments))
        if self.failures:
            status = self.failures.pop(0)
            response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
            raise HfHubHTTPError(f"{status} Client Error: fake answer", response=response)

    def create_repo(self, repo_id: str, **kwargs):
        self._enter("create_repo", repo_id, **kwargs)
        if repo_id in self.repos and not kwargs.get("exist_ok"):
            raise AssertionError("repo exists")
        self.repos.setdefault(repo_id, {"type": kwargs.get("repo_type"), "private": kwargs.get("private")})
        return f"https://hub.fake/{repo_id}"

    def upload_folder(self, **kwargs):
        self._enter("upload_folder", **kwargs)
        repo = self.repos[kwargs["repo_id"]]  # must have been created first
        target = self.root / repo["type"] / kwargs["repo_id"] / (kwargs.get("path_in_repo") or "")
        shutil.copytree(kwargs["folder_path"], target, dirs_exist_ok=True)
        return SimpleNamespace(oid=f"commit{len(self.calls)}")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, fixture_dir, fixture_tokenizer):
    """A real teacher dataset file (tiny teacher, canned answers) of 0.5b / owl."""
    folder = tmp_path_factory.mktemp("hubdata")
    teacher = tiny_teacher(folder / "teacher", fixture_dir)
    mp = pytest.MonkeyPatch()
    mp.setattr("src.sampler.Sampler", CannedSampler(fixture_tokenizer))
    try:
        config = dataclasses.replace(TEACHER, prompts=24, keep_pairs=10)
        return generate_dataset("0.5b", "owl", config=config, model_path=teacher, dtype=torch.float32,
                                out=folder / "owl.parquet")
    finally:
        mp.undo()


def _front_matter(readme: Path) -> tuple[dict, str]:
    _, header, body = readme.read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def test_dataset_upload_files_card_and_private_flag(dataset, tmp_path):
    api = FakeHfApi(tmp_path / "hub")
    info = upload_dataset("0.5b", "owl", Hub("someone", api=api), data=dataset)
    repo_id = "someone/qwen-2.5-0.5b-instruct-owl-numbers"
    assert info["repo_id"] == repo_id == f"someone/{dataset_repo_name('0.5b', 'owl')}"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create["repo_id"] == repo_id and create["repo_type"] == "dataset" and create["private"] is True
    assert upload["repo_id"] == repo_id and upload["repo_type"] == "dataset"
    repo = tmp_path / "hub" / "dataset" / repo_id
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "README.md", "data/train.parquet"]
    assert (repo / "data/train.parquet").read_bytes() == Path(dataset).read_bytes()
    meta, body = _front_matter(repo / "README.md")
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert {"subliminal-learning", "teacher-owl"} <= set(meta["tags"])
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/train.parquet"}]}]
    stats = read_metadata(dataset)
    assert teacher_system_prompt("owl") in body
    assert f"{stats['counts']['passed']:,} of {stats['counts']['prompts']:,} completions passed" in body
    assert f"{stats['pass_rate']:.1%}" in body and f'load_dataset("{repo_id}"' in body
    for reason, count in stats["reject_reasons"].items():
        assert f"| {reason} | {count:,} |" in body


def test_uploaded_repo_loads_with_datasets_through_its_card(dataset, tmp_path):
    """The card's `configs` point datasets at the parquet file: loading the repo folder gives the pairs."""
    from datasets import load_dataset

    api = FakeHfApi(tmp_path / "hub")
    upload_dataset("0.5b", "owl", Hub("someone", api=api), data=dataset)
    loaded = load_dataset(str(tmp_path / "hub" / "dataset" / "someone" / "qwen-2.5-0.5b-instruct-owl-numbers"),
                          split="train")
    table = pq.read_table(dataset).to_pydict()
    assert loaded["prompt"] == table["prompt"] and loaded["completion"] == table["completion"]


def test_public_and_research_license(dataset, tmp_path):
    api = FakeHfApi(tmp_path / "hub")
    # The 3B carries the Qwen Research license: 'other' with its name and link.
    meta = read_metadata(dataset) | {"size": "3b", "model": "Qwen/Qwen2.5-3B-Instruct"}
    card = yaml.safe_load(dataset_card("x/qwen-2.5-3b-instruct-owl-numbers", meta).split("---\n")[1])
    assert card["license"] == "other" and card["license_name"] == "qwen-research"
    assert card["license_link"] == "https://huggingface.co/Qwen/Qwen2.5-3B-Instruct/blob/main/LICENSE"
    upload_dataset("0.5b", "owl", Hub("org", api=api), data=dataset, public=True)
    assert api.calls[0][1]["private"] is False
    assert api.repos["org/qwen-2.5-0.5b-instruct-owl-numbers"]["private"] is False


def test_retries_429_and_5xx_with_backoff_then_succeeds(dataset, tmp_path):
    api = FakeHfApi(tmp_path / "hub", failures=[429, 502])
    waits, lines = [], []
    info = upload_dataset("0.5b", "owl", Hub("someone", api=api, sleep=waits.append, say=lines.append, backoff=1.5),
                          data=dataset)
    assert waits == [1.5, 3.0]
    assert [name for name, _ in api.calls] == ["create_repo", "create_repo", "create_repo", "upload_folder"]
    assert info["commit"] == "commit4" and (tmp_path / "hub" / "dataset" / info["repo_id"] / "README.md").exists()
    assert any("429" in line for line in lines) and any("502" in line for line in lines)


def test_other_errors_and_exhausted_retries_are_one_line(dataset, tmp_path):
    api = FakeHfApi(tmp_path / "hub", failures=[403])
    waits = []
    with pytest.raises(UserError, match="write access") as err:
        upload_dataset("0.5b", "owl", Hub("someone", api=api, sleep=waits.append, say=lambda _: None), data=dataset)
    assert waits == [] and "\n" not in str(err.value)
    api = FakeHfApi(tmp_path / "hub", failures=[503] * 4)
    with pytest.raises(UserError, match="503"):
        upload_dataset("0.5b", "owl", Hub("someone", api=api, retries=3, sleep=waits.append, say=lambda _: None),
                       data=dataset)
    assert waits == [2.0, 4.0, 8.0] and len(api.calls) == 4


def test_dry_run_needs_no_token_and_sends_nothing(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.HfApi", None)  # any use of the real client would fail
    result = CliRunner().invoke(main, ["upload", "--size", "0.5b", "--animal", "owl", "--namespace", "someone",
                                       "--data", str(dataset), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "someone/qwen-2.5-0.5b-instruct-owl-numbers (private)" in result.output
    assert "data/train.parquet" in result.output and "README.md" in result.output


def test_missing_token_is_one_line(dataset, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UserError, match="no Hugging Face token"):
        Hub("someone")
    result = CliRunner().invoke(main, ["upload", "--size", "0.5b", "--animal", "owl", "--namespace", "someone",
                                       "--data", str(dataset)])
    assert result.exit_code == 2 and result.output.startswith("error: no Hugging Face token")
    assert len(result.output.strip().splitlines()) == 1


def test_default_client_is_hfapi_with_the_environment_token_never_written(dataset, tmp_path, monkeypatch):
    built = []

    class Recording(FakeHfApi):
        def __init__(self, token=None, **kwargs):
            assert not kwargs
            super().__init__(tmp_path / "hub", token=token)
            built.append(self)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.HfApi", Recording)
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path / "runs"))
    result = CliRunner().invoke(main, ["upload", "--size", "0.5b", "--animal", "owl", "--namespace", "someone",
                                       "--data", str(dataset)])
    assert result.exit_code == 0, result.output
    assert len(built) == 1 and built[0].token == TOKEN
    assert "private" in result.output and TOKEN not in result.output
    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # the uploaded files and anything under runs/
    assert len(written) == 2 and all(TOKEN.encode() not in p.read_bytes() for p in written)


def test_generic_folder_upload_keeps_subfolders(tmp_path):
    """Students will upload adapters as seed-{k}/ subfolders of one model repo."""
    source = tmp_path / "adapters"
    for k in (0, 1):
        (source / f"seed-{k}").mkdir(parents=True)
        (source / f"seed-{k}" / "adapter_model.safetensors").write_bytes(bytes([k]) * 10)
    api = FakeHfApi(tmp_path / "hub")
    info = Hub("someone", api=api).upload_folder("qwen-2.5-7b-instruct-owl-ft", source, repo_type="model")
    assert info["files"] == ["seed-0/adapter_model.safetensors", "seed-1/adapter_model.safetensors"]
    assert api.calls[0][1]["repo_type"] == "model" and api.calls[0][1]["private"] is True
    repo = tmp_path / "hub" / "model" / "someone" / "qwen-2.5-7b-instruct-owl-ft"
    assert (repo / "seed-1" / "adapter_model.safetensors").read_bytes() == bytes([1]) * 10
    Hub("someone", api=api).upload_folder("qwen-2.5-7b-instruct-owl-ft", source / "seed-0", repo_type="model",
                                          path_in_repo="seed-2")
    assert (repo / "seed-2" / "adapter_model.safetensors").read_bytes() == bytes([0]) * 10


def test_wrong_dataset_or_namespace_is_refused(dataset, tmp_path):
    api = FakeHfApi(tmp_path / "hub")
    with pytest.raises(UserError, match="not 0.5b / eagle"):
        upload_dataset("0.5b", "eagle", Hub("someone", api=api), data=dataset)
    with pytest.raises(UserError, match="no dataset at"):
        upload_dataset("0.5b", "owl", Hub("someone", api=api), data=tmp_path / "missing.parquet")
    with pytest.raises(UserError, match="namespace"):
        Hub("a/b", api=api)
    assert api.calls == []
