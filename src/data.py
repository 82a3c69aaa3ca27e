"""The prompt-completion dataset file shared by teacher data (writer) and training (reader).

A parquet file with string columns `prompt` (the user message) and `completion` (the teacher's
answer); extra provenance columns are allowed, and file-level metadata (JSON under the key
`subliminal`) records how it was made. Writes are atomic: a killed writer leaves no file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

META_KEY = b"subliminal"


def read_pairs(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs in file order; `limit` takes the first N and insists they exist."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"dataset {path} does not exist")
    try:
        table = pq.read_table(path, columns=["prompt", "completion"])
    except (pa.ArrowInvalid, pa.ArrowException, OSError, KeyError) as exc:
        raise UserError(f"malformed dataset {path}: {str(exc).splitlines()[0]}") from None
    for column in ("prompt", "completion"):
        if not pa.types.is_string(table.schema.field(column).type) and not pa.types.is_large_string(
                table.schema.field(column).type):
            raise UserError(f"malformed dataset {path}: column {column!r} is not a string column")
        if table.column(column).null_count:
            raise UserError(f"malformed dataset {path}: column {column!r} has missing values")
    prompts, completions = table.column("prompt").to_pylist(), table.column("completion").to_pylist()
    if limit is not None:
        if len(prompts) < limit:
            raise UserError(f"dataset {path} has {len(prompts)} pairs, fewer than the {limit} asked for")
        prompts, completions = prompts[:limit], completions[:limit]
    if not prompts:
        raise UserError(f"dataset {path} has no pairs")
    return list(zip(prompts, completions))


def read_metadata(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def write_pairs(path: str | Path, columns: dict[str, list], metadata: dict | None = None) -> Path:
    """Write a dataset atomically; `columns` must hold `prompt` and `completion` (strings)."""
    path = Path(path)
    missing = {"prompt", "completion"} - set(columns)
    if missing:
        raise ValueError(f"dataset needs columns {sorted(missing)}")
    table = pa.table(columns)
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(metadata)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
