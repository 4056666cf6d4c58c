"""Writing an output file without damaging what is there. Every file the
package writes (results, targets, reports, tables, plots) goes through
`open_output`:

- a regular file, or a name with no file yet, is written whole or not at all:
  into a temporary file beside it, flushed to disk, then renamed over it. An
  exception, Ctrl-C included, removes the temporary file and leaves the old
  file as it was;
- a symlink is followed: the file it points to is replaced, beside that file,
  and the link stays a link;
- anything else that exists (a FIFO, a character or block device) is written
  in place, never renamed over: a rename would put a plain file where the pipe
  or the device node was. So is a path that reaches an open descriptor through
  /dev/fd, /dev/stdout or /proc/<pid>/fd (the shell holds that file open: a
  rename would leave it writing to a file with no name). Written in place
  means appended: nothing there is truncated;
- a new file gets the mode the umask gives, as `open` does (0o644 under umask
  022); a file that is replaced keeps its mode.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import IO, Iterator, Optional

__all__ = ["open_output", "write_bytes", "write_text"]

_MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one lookup


@contextlib.contextmanager
def open_output(path: str, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """`open(path, mode)` for writing ("w" or "wb"; `open_kwargs` as open's:
    encoding, newline), with the guarantees of this module."""
    if mode not in ("w", "wb"):
        raise ValueError(f"open_output: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    path = os.fspath(path)
    if not path or path.endswith(os.sep):  # realpath would drop the slash and write a file named like the directory
        raise IsADirectoryError(f"argument 'path' must name a file, got {path!r}")
    existing = _stat(path)
    if existing is not None and (not stat.S_ISREG(existing.st_mode) or _reaches_a_descriptor(path)):
        with open(path, mode.replace("w", "a"), **open_kwargs) as f:  # a directory fails here, as open() says
            yield f
        return
    real = os.path.realpath(path)
    tmp: Optional[str] = None
    try:
        name = _temporary_name(real)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        tmp = name  # ours from here on: removed unless renamed into place
        try:
            f = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)
            raise
        with f:
            if existing is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
        tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    with open_output(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with open_output(path, "w") as f:
        f.write(text)


def _stat(path: str) -> Optional[os.stat_result]:
    """What `path` names, symlinks followed; None when nothing is there yet
    (a dangling symlink included: its target is created)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _temporary_name(real: str) -> str:
    directory, base = os.path.split(real)
    # a short stem: the temporary name must fit NAME_MAX wherever the target does
    return os.path.join(directory, f".{base[:200]}.{secrets.token_hex(8)}.tmp")


def _reaches_a_descriptor(path: str) -> bool:
    """Whether following `path`'s symlinks passes through /proc (/dev/stdout
    -> /proc/self/fd/1 -> the file the shell redirected to)."""
    hop = os.path.abspath(path)
    for _ in range(_MAX_LINKS):
        hop = os.path.join(os.path.realpath(os.path.dirname(hop)), os.path.basename(hop))
        if hop == "/proc" or hop.startswith("/proc/"):
            return True
        if not os.path.islink(hop):
            return False
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return False  # a loop: os.stat has already refused it
