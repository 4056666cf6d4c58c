"""Where the lmms-eval model (`lmms_eval.py`) writes under ``save_offsets``:
one offsets file per generate call and one JSONL log per rank. Apart from
lmms_eval.py, which needs lmms-eval to import, so that the names can be
checked without it.

A generate call's file is never another call's: a task's ``repeats`` sends the
same document again (and batches can start and end at the same documents), so
the name ends with the rank and the call's number in this run; the task, split
and document ids before them are for the reader. Characters a file name cannot
hold are %XX, as `provenance.file_name` writes them.
"""

from __future__ import annotations

import os
from typing import Sequence

from ..tools.provenance import file_name

__all__ = ["offsets_file", "log_file"]


def offsets_file(directory: str, task: str, split: str, doc_ids: Sequence, rank: int, call: int) -> str:
    """The file of the `call`-th generate call (counted from 0 by each rank) that saved offsets."""
    ids = str(doc_ids[0]) + (f"-{doc_ids[-1]}" if len(doc_ids) > 1 else "")
    return os.path.join(directory, file_name(f"{task}-{split}-{ids}") + f".rank{int(rank)}.call{int(call)}.safetensors")


def log_file(directory: str, rank: int) -> str:
    """A rank's log: one JSON line per request."""
    return os.path.join(directory, f"replay.rank{int(rank)}.jsonl")
