"""Qwen2.5 tokenizer and chat template over `tokenizers`, no transformers.

The chat template is rendered in Python for the cases this study uses (system / user /
assistant text messages, no tools): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message,
the model's default system prompt when the conversation has none, and `<|im_start|>assistant\\n`
as the generation prompt. The default system prompt is read from the checkpoint's own template
(Qwen2.5 and Qwen2.5-Coder word it the same; we do not assume it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer

from .checkpoint import resolve
from .constants import ENDOFTEXT, IM_END, IM_START, QWEN_DEFAULT_SYSTEM_PROMPT
from .errors import UserError

Message = dict[str, str]
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "config.json"]


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt a Qwen template inserts when there is none (None: it inserts nothing)."""
    if not template:
        return QWEN_DEFAULT_SYSTEM_PROMPT
    found = re.search(r"'<\|im_start\|>system\\n([^']*)<\|im_end\|>\\n'", template)
    return found.group(1) if found else None


class ChatTokenizer:
    def __init__(self, tokenizer: Tokenizer, system_default: str | None) -> None:
        self.tokenizer = tokenizer
        self.system_default = system_default
        self.im_end_id = self.token_id(IM_END)
        self.endoftext_id = self.token_id(ENDOFTEXT)
        self.stop_ids = (self.im_end_id, self.endoftext_id)
        self.pad_id = self.endoftext_id

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise UserError(f"tokenizer has no {token} token: not a Qwen2.5 tokenizer")
        return tid

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The chat template's text for a conversation."""
        if not messages or messages[0]["role"] != "system":
            if self.system_default is not None:
                messages = [{"role": "system", "content": self.system_default}, *messages]
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render(messages, add_generation_prompt))

    def encode_pair(self, prompt: str, completion: str, system: str | None = None) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of a one-turn exchange, split as TRL does: the completion is
        what the full conversation's tokens add after the generation prompt's tokens, so it ends with
        `<|im_end|>` and the template's newline."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}]
        prompt_ids = self.encode_chat(messages, add_generation_prompt=True)
        full = self.encode_chat([*messages, {"role": "assistant", "content": completion}], add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise UserError(f"prompt tokens are not a prefix of the conversation's tokens for {prompt[:40]!r}")
        return prompt_ids, full[len(prompt_ids):]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def load_tokenizer(name_or_path: str | Path) -> ChatTokenizer:
    """The tokenizer of a checkpoint folder, study size or Hub id."""
    folder = resolve(name_or_path, TOKENIZER_PATTERNS)
    file = folder / "tokenizer.json"
    if not file.exists():
        raise UserError(f"no tokenizer.json in {folder}")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"corrupt tokenizer file {file}: {exc}") from None
    template = None
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text()
    return ChatTokenizer(tokenizer, default_system_prompt(template))
