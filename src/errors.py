"""One exception for every problem a user can fix: the CLI prints it as one line and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (size, animal, dataset, checkpoint, token, memory): message is the whole story."""
