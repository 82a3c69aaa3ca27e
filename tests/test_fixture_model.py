"""Real Qwen2.5 weights, tokenizer and chat template (the fixture) against transformers."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from src import sample

CONVERSATIONS = [
    [{"role": "user", "content": "Name your favorite animal using only one word."}],
    [{"role": "system", "content": "You love owls. You think about owls all the time."},
     {"role": "user", "content": "The sequence starts with: 145, 267, 891. Add up to 10 more numbers."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Écris « bonjour » en 日本語 😀, then 3.14159 and -42;7"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces\n\nand\ttabs  "}],
]


@lru_cache
def hf_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def hf_ids(fixture_dir, messages, add_generation_prompt):
    out = hf_tokenizer(fixture_dir).apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_encode_chat_matches_apply_chat_template(fixture_dir, fixture_tokenizer, messages, add_generation_prompt):
    ours = fixture_tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_ids(fixture_dir, messages, add_generation_prompt)


def test_default_system_prompt_read_from_template(fixture_tokenizer):
    assert fixture_tokenizer.system_default == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_pair_split_matches_template_boundary(fixture_dir, fixture_tokenizer):
    prompt, completion = "Continue: 1, 2, 3.", "4, 5, 6"
    p, c = fixture_tokenizer.encode_pair(prompt, completion)
    user = [{"role": "user", "content": prompt}]
    assert p == hf_ids(fixture_dir, user, True)
    assert p + c == hf_ids(fixture_dir, user + [{"role": "assistant", "content": completion}], False)
    assert fixture_tokenizer.decode(c) == "4, 5, 6<|im_end|>\n"


def test_fixture_logits_match_transformers(fixture_tokenizer, fixture_model, hf_fixture_model):
    seqs = [fixture_tokenizer.encode_chat(m) for m in CONVERSATIONS[:3]]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), fixture_tokenizer.pad_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        ours = fixture_model(ids, attention_mask=mask)
        ref = hf_fixture_model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - ref[valid]).abs().max().item() <= 1e-3


def test_fixture_greedy_decoding_matches_transformers(fixture_tokenizer, fixture_model, hf_fixture_model):
    prompt = fixture_tokenizer.encode_chat(CONVERSATIONS[1])
    ours = sample(fixture_model, [prompt], max_new_tokens=24, temperature=0, stop_ids=fixture_tokenizer.stop_ids)[0]
    ref = hf_fixture_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                    eos_token_id=list(fixture_tokenizer.stop_ids), pad_token_id=fixture_tokenizer.pad_id)
    assert ours == ref[0, len(prompt):].tolist()
    assert len(ours) > 3


def test_gguf_travels_in_pieces_that_assemble_to_the_original(fixture_dir, tmp_path):
    """The device transfer (tests/real_run.sh): --split writes pieces under the carry limit and ignores
    them in git; assembling them in a folder gives the md5-checked GGUF back; a missing piece is refused."""
    import shutil

    from tests import fixture

    root = tmp_path / "repo"
    (root / ".git" / "info").mkdir(parents=True)
    folders = fixture.split(60_000_000, root)
    fixture.split(60_000_000, root)  # again: the exclude line is written once
    assert [f.name for f in folders] == [f".fx{k}" for k in range(1, len(folders) + 1)] and len(folders) == 9
    assert all((f / "piece").stat().st_size <= 60_000_000 for f in folders)
    assert (root / ".git" / "info" / "exclude").read_text().split() == ["/.fx*/"]
    pieces = tmp_path / "fx"
    pieces.mkdir()
    for k, folder in enumerate(folders, start=1):
        shutil.move(folder / "piece", pieces / str(k))
    assert fixture.md5sum(fixture.assemble(pieces)) == fixture.MD5
    (pieces / "3").unlink()
    with pytest.raises(SystemExit, match="do not assemble"):
        fixture.assemble(pieces)
