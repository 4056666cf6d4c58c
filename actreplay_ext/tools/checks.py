"""The checks a command runs before it loads any weights: checkpoints exist
(a local path that does not is "not found", not a bad hub id), the base/RLVR
pair fits together and the replay configuration fits the model (the very
checks `patch` runs, on weightless copies built from the configs), input files
exist, output files can be written. Each failure is a `UsageError` naming the
argument."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, Optional

import torch

from .console import STDOUT, UsageError

__all__ = ["is_local", "checkpoint_config", "checkpoint_identity", "checkpoint_location", "file_sha256",
           "check_pair_configs", "input_file", "output_file", "distinct_outputs", "output_dir", "media_files"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local(path: str) -> bool:
    """Whether `path` names a local directory (existing or not) rather than a hub
    id. `org/name` whose `org` is a local directory is a local path (a typo in
    `pair/rlvrr` is "not found" at once, not five retries against the hub)."""
    first = path.split("/", 1)[0]
    return (os.path.exists(path) or not _HUB_ID.match(path) or path.startswith((".", "~"))
            or (first != path and os.path.isdir(first)))


def checkpoint_config(path: str, arg: str):
    """The transformers config of checkpoint `path` (a local directory, or a
    hub id where the network or the cache allows)."""
    from transformers import AutoConfig

    local = is_local(path)
    if local:
        if not os.path.isdir(path):
            raise UsageError(f"{arg}: {path!r} not found (no such directory)" if not os.path.exists(path)
                             else f"{arg}: {path!r} is a file; give the checkpoint's directory")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{arg}: {path!r} holds no config.json; it is not a transformers checkpoint")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "the directory" if local else "the hub (or its cache)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{arg}: cannot read the config of {path!r} from {where}: {first}") from None


def _weightless(config):
    """The model of `config` on the meta device: its adapter sees the
    architecture without a byte of weights."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError as e:  # a config the auto class does not know
            raise UsageError(f"{type(config).__name__} is not a vision-language model transformers can "
                             f"build ({str(e).splitlines()[0]})") from None


def check_pair_configs(base_config, rlvr_config, cfg=None) -> None:
    """`patch`'s own pair and configuration checks, on weightless models."""
    from ..core.validation import check_config_for
    from ..models import get_adapter
    from ..models.registry import check_pair

    rlvr = get_adapter(_weightless(rlvr_config), "--rlvr")
    if base_config is not None:
        base = get_adapter(_weightless(base_config), "--base")
        check_pair(rlvr, base)
    if cfg is not None:
        check_config_for(rlvr, cfg, "RLVR")


#: files of a checkpoint that build the prompt (processor, chat template, tokenizer) or set generation defaults
PROMPT_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
                "merges.txt", "added_tokens.json", "generation_config.json")


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 24  # 16 MiB per read while hashing weights


def file_sha256(path: str, known: Optional[Dict] = None) -> str:
    """The sha256 of a file's bytes. `known` (realpath -> [size, mtime_ns, sha256])
    holds hashes already computed: a file whose size and modification time are
    unchanged is not read again, and what is hashed here is added to it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    cached = (known or {}).get(real)
    if isinstance(cached, list) and len(cached) == 3 and cached[:2] == [st.st_size, st.st_mtime_ns]:
        return cached[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    if known is not None:
        known[real] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest()


def checkpoint_identity(path: str, config=None, content: bool = True, known: Optional[Dict] = None) -> Dict:
    """What a checkpoint is, by content, not by where it lies or when its files
    were touched: the hash of its config.json and of the files that build the
    prompt (processor, chat template, tokenizer, generation defaults: a changed
    template changes every prompt), the names and sizes of its weight files and,
    with `content`, the sha256 of their bytes (`known`: hashes computed before,
    see file_sha256); a hub id is its id and revision. The same model from
    another working directory, a copy, or a touched file is the same identity."""
    if not os.path.isdir(path):
        ident: Dict = {"hub": path}
        revision = getattr(config, "_commit_hash", None)
        if revision:
            ident["revision"] = revision
        return ident
    ident = {}
    with open(os.path.join(path, "config.json"), "rb") as f:
        ident["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
    prompt = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name in PROMPT_FILES or name.startswith("chat_template"):
            with open(os.path.join(path, name), "rb") as f:
                prompt.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    ident["prompt_files_sha256"] = prompt.hexdigest()
    weights = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_FILES))
    ident["weights"] = [[n, os.path.getsize(os.path.join(path, n))] + ([file_sha256(os.path.join(path, n), known)]
                                                                        if content else []) for n in weights]
    return ident


def checkpoint_location(path: str) -> Dict:
    """Where a checkpoint was read from (for the records; not part of what it is)."""
    return {"path": path, "resolved": os.path.realpath(path)} if os.path.isdir(path) else {"path": path}


def input_file(path: Optional[str], arg: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{arg}: {path!r} not found" if not os.path.exists(path) else f"{arg}: {path!r} is not a file")


def output_file(path: Optional[str], arg: str, stdout: bool = False) -> None:
    """`path` can be written: the directory of the file it names (symlinks
    followed) exists and is writable, and it is not a directory. "-" is the
    standard output where `stdout` allows it, else refused: never a file named "-"."""
    if path is None:
        return
    if path == STDOUT:
        if stdout:
            return
        raise UsageError(f"{arg}: '-' would be the standard output, which {arg} does not write to; give a file "
                         "name (./- for a file named '-')")
    directory = os.path.dirname(os.path.realpath(path))
    if os.path.isdir(path):
        raise UsageError(f"{arg}: {path!r} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UsageError(f"{arg}: the directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{arg}: the directory {directory!r} is not writable")


def distinct_outputs(outputs: Dict[str, Optional[str]], inputs: Optional[Dict[str, object]] = None) -> None:
    """No two output options name one file (each would overwrite the other), and
    no output names a file the command reads (`inputs`: option -> a path or a
    list of paths): `--json c.png` once replaced the image with JSON."""
    read: Dict[str, str] = {}
    for arg, paths in (inputs or {}).items():
        for path in (paths if isinstance(paths, (list, tuple)) else [paths]):
            if path is not None:
                read[os.path.realpath(path)] = f"{arg} {path!r}"
    for arg, path in outputs.items():
        if path is not None and path != STDOUT and os.path.realpath(path) in read:
            raise UsageError(f"{arg}: {path!r} is the file {read[os.path.realpath(path)]} reads; give the output "
                             "its own file")
    seen: Dict[str, str] = {}
    for arg, path in outputs.items():
        if path is None or path == STDOUT:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{arg}: {path!r} is the file {seen[real]} writes too; give each output its own file")
        seen[real] = arg


def output_dir(path: Optional[str], arg: str) -> None:
    """`path` is (or is made) a writable directory; "-" is refused (it cannot be
    the standard output: several files go there)."""
    if path is None:
        return
    if path == STDOUT:
        raise UsageError(f"{arg}: '-' would be the standard output, but {arg} is a directory for several files; "
                         "give a directory name (./- for one named '-')")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{arg}: {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{arg}: cannot create the directory {path!r} ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{arg}: the directory {path!r} is not writable")


def media_files(images, video, where: str) -> None:
    """Every image and video path of a prompt exists (`where` names the
    argument or the `file:line`)."""
    for p in images or []:
        if isinstance(p, str) and not os.path.isfile(p):
            raise UsageError(f"{where}: image {p!r} not found")
    frames = video if isinstance(video, (list, tuple)) else [video] if isinstance(video, str) else []
    for p in frames:
        if isinstance(p, str) and not os.path.exists(p):
            raise UsageError(f"{where}: video {p!r} not found")
