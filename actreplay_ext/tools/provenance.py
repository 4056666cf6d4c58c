"""How a result was made, for the files the tools write: the resolved replay
configuration as plain JSON, the versions of everything that computes it
(and the git revision of the source when it is a checkout), and file names
made from dataset ids, one name per id."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Dict, Optional

__all__ = ["config_dict", "versions", "git_revision", "file_name"]


def config_dict(cfg) -> Dict:
    """The fields of a ReplayConfig as JSON values (the callback is not a setting)."""
    return cfg.as_dict()


def git_revision() -> Optional[Dict]:
    """The commit of the package's source and whether it has local changes,
    when the package runs from a git checkout (an installed wheel: None)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        # the package's own source must be tracked there: an install inside the user's project
        # (project/.venv/...) sits in a work tree whose commit is the project's, not the package's
        mine = subprocess.run(["git", "-C", here, "ls-files", "--error-unmatch", os.path.abspath(__file__)],
                              capture_output=True, text=True, timeout=10)
        if mine.returncode != 0:
            return None
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> Dict:
    import torch
    import transformers

    import actreplay_ext

    info = actreplay_ext.build_info()
    return {"actreplay_ext": actreplay_ext.__version__, "git": git_revision(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda_kernels": bool(info.get("cuda")), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None}


_KEPT = re.compile(r"[\w.-]")  # letters and digits of any script, '_', '.', '-'


def file_name(row_id: str) -> str:
    """A dataset id as a file name, one to one, so two ids never share a file:
    letters, digits, '_', '-' and '.' stay, every other character ('/', '%'
    itself, spaces) becomes %XX of its UTF-8 bytes as in a URL, and so does a
    leading '.' (no hidden names, no '..'): 'q/1' -> 'q%2F1', 'q_1' -> 'q_1'.
    The empty id is '%', which no other id gives."""
    text = str(row_id)
    if not text:
        return "%"
    out = []
    for i, ch in enumerate(text):
        keep = _KEPT.fullmatch(ch) and not (i == 0 and ch == ".")
        out.append(ch if keep else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
    return "".join(out)
