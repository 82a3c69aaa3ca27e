"""The one place that talks to the Hugging Face Hub (huggingface_hub underneath).

Downloads are snapshot downloads filtered by pattern. Uploads (datasets, students) go through
`Hub`, whose methods are few and plain so tests can point it at a local fake of the Hub API.
The token comes only from the environment or huggingface_hub's own login; nothing here writes it.
"""
from __future__ import annotations

from pathlib import Path

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
