"""Prompts from JSONL files and real checkpoints from disk: what the CLI, the
ablation and the Pass@K harness share.

A dataset row is one JSON object per line:

* ``question`` (required): the text of the prompt;
* ``image`` (a path) or ``images`` (a list of paths), optional;
* ``video`` (optional): a video file (decoded with PyAV, the ``video`` extra:
  a frame every 0.5 s, at most 64), a directory of frame images (every one,
  in name order), or a list of frame image paths;
* ``answer`` (for evaluation), ``choices`` (optional list: a multiple-choice
  question, shown as lettered options), ``id`` (optional; the line number
  otherwise).

Relative paths are resolved against the JSONL file's directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import string
from typing import Any, Dict, List, Optional

import torch

from ..models.offload import execution_device

__all__ = ["Row", "read_jsonl", "encode", "encode_batch", "decode_video", "load_model", "load_processor",
           "question_text", "decode_new", "input_device", "synthetic_rows"]


@dataclasses.dataclass
class Row:
    id: str
    question: str
    images: List[Any] = dataclasses.field(default_factory=list)  # paths or PIL images
    video: Any = None  # path, directory, or list of frames (paths or PIL images)
    answer: Optional[str] = None
    choices: Optional[List[str]] = None


def _resolve(path, root: str):
    return os.path.join(root, path) if isinstance(path, str) and not os.path.isabs(path) else path


#: the fields a row is read from; others (a dataset's own metadata) are kept out of the prompt
ROW_FIELDS = ("id", "question", "image", "images", "video", "answer", "choices")
log = logging.getLogger("actreplay_ext")


def read_jsonl(path: str, check_files: bool = True) -> List[Row]:
    """The rows of a JSONL dataset; a malformed line, a field that looks like a
    misspelt row field ("img" for "image": the row would run text-only), or (with
    `check_files`) an image or video that is not there or does not decode, is an
    error naming `file:line`. A file without rows is an error too."""
    root = os.path.dirname(os.path.abspath(path))
    rows, seen = [], set()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} not found" if not os.path.exists(path) else f"{path!r} is not a file")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("question"), str):
                raise ValueError(f"{path}:{n}: each row needs a 'question' string")
            for key in obj:
                close = difflib.get_close_matches(key, ROW_FIELDS, n=1, cutoff=0.7) if key not in ROW_FIELDS else []
                if close:
                    raise ValueError(f"{path}:{n}: field {key!r} is not a row field; did you mean {close[0]!r}? "
                                     f"(a row reads {', '.join(ROW_FIELDS)}; rename it, or give metadata another name)")
            images = [obj["image"]] if "image" in obj else list(obj.get("images", []))
            video = obj.get("video")
            if isinstance(video, list):
                video = [_resolve(p, root) for p in video]
            elif video is not None:
                video = _resolve(video, root)
            row = Row(id=str(obj.get("id", n)), question=obj["question"], images=[_resolve(p, root) for p in images],
                      video=video, answer=None if obj.get("answer") is None else str(obj["answer"]),
                      choices=obj.get("choices"))
            if row.id in seen:
                raise ValueError(f"{path}:{n}: duplicate id {row.id!r}")
            _check_row(row, obj, f"{path}:{n}", check_files)
            seen.add(row.id)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: holds no rows (each line a JSON object with a 'question')")
    text_only = sum(1 for r in rows if not r.images and r.video is None)
    if text_only:
        log.warning("%s: %d of %d rows have no image or video (replay leaves them unchanged)", path, text_only,
                    len(rows))
    return rows


def _check_row(row: Row, obj: Dict, where: str, check_files: bool) -> None:
    """The fields' types, and (with `check_files`) that every file is there.
    Other fields (a dataset's own metadata) are allowed and ignored."""
    if not all(isinstance(p, str) for p in row.images):
        raise ValueError(f"{where}: 'image'/'images' must be a path or a list of paths")
    if row.choices is not None and (not isinstance(row.choices, list) or not row.choices
                                    or len(row.choices) > len(string.ascii_uppercase)):
        raise ValueError(f"{where}: 'choices' must be a list of 1..26 options")
    if not check_files:
        return
    for p in row.images:
        if not os.path.isfile(p):
            raise ValueError(f"{where}: image {p!r} not found")
        _check_image(p, where)
    frames = row.video if isinstance(row.video, list) else [row.video] if row.video is not None else []
    for p in frames:
        if not isinstance(p, str) or not os.path.exists(p):
            raise ValueError(f"{where}: video {p!r} not found")
        if isinstance(row.video, list):
            _check_image(p, where, "video frame")
        elif os.path.isdir(p):
            if not _frame_files(p):
                raise ValueError(f"{where}: video directory {p!r} holds no frame images")
        else:
            _check_video(p, where)


def _check_image(path: str, where: str, what: str = "image") -> None:
    """The file decodes as an image (read before any model loads, so a broken file is
    found in seconds and named by its row)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        raise ValueError(f"{where}: {what} {path!r} does not decode ({type(e).__name__}: {e})") from None


def _check_video(path: str, where: str) -> None:
    try:
        import av
    except ImportError:
        return  # decoding needs PyAV; encode() names the extra when it comes to it
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            next(container.decode(video=0))
    except (av.error.FFmpegError, ValueError, StopIteration, IndexError) as e:
        raise ValueError(f"{where}: video {path!r} does not decode ({type(e).__name__}: {e})") from None


def question_text(row: Row) -> str:
    """The question, with lettered options for a multiple-choice row."""
    if not row.choices:
        return row.question
    options = "\n".join(f"{letter}. {c}" for letter, c in zip(string.ascii_uppercase, row.choices))
    return f"{row.question}\n{options}"


def _image(item):
    from PIL import Image

    return item if not isinstance(item, str) else Image.open(item).convert("RGB")


#: How a video file becomes frames: one every 1/VIDEO_FPS seconds (Qwen2-VL's
#: default rate), spaced wider when that would exceed VIDEO_MAX_FRAMES.
VIDEO_FPS = 2.0
VIDEO_MAX_FRAMES = 64


def decode_video(path: str, fps: float = VIDEO_FPS, max_frames: int = VIDEO_MAX_FRAMES) -> List[Any]:
    """The frames of a video file as PIL images, decoded with PyAV (the
    `video` extra), sampled at `fps` and at most `max_frames`; only the
    kept frames are converted, so a long video does not fill the memory."""
    return _decode_video(path, fps, max_frames)[0]


def _decode_video(path: str, fps: float, max_frames: int):
    """(frames, the rate they were kept at in frames per second of video)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} not found")
    try:
        import av
    except ImportError:
        raise ImportError("decoding a video file needs PyAV: pip install 'actreplay_ext[video]' "
                          "(or give a directory of frame images)") from None
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            step = max(1.0 / fps, duration / max_frames if duration else 0.0)
            rate = float(stream.average_rate or 1)
            frames, start = [], None
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                if start is None:  # the clock starts at the first frame: timestamps need not start at 0
                    start = t
                if t + 1e-6 >= start + len(frames) * step and len(frames) < max_frames:
                    frames.append(frame.to_image())
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"video {path!r} cannot be decoded ({e})") from None
    if not frames:
        raise ValueError(f"video {path!r} holds no frames")
    return frames, 1.0 / step


def _frame_files(directory: str) -> List[str]:
    """The frame images of a video directory, by name."""
    return sorted(n for n in os.listdir(directory) if n.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))


def _frames(video):
    """A video as the processor takes it, and its frame rate: a list of frames
    (a list of images or paths, a directory of frame images: taken to be
    VIDEO_FPS apart), or a file decoded with PyAV (the rate it was sampled at)."""
    if isinstance(video, (list, tuple)):
        return [_image(f) for f in video], VIDEO_FPS
    if isinstance(video, str) and os.path.isdir(video):
        names = _frame_files(video)
        if not names:
            raise ValueError(f"video directory {video!r} holds no frame images (.png/.jpg/.jpeg/.webp)")
        return [_image(os.path.join(video, n)) for n in names], VIDEO_FPS
    if isinstance(video, str):
        return _decode_video(video, VIDEO_FPS, VIDEO_MAX_FRAMES)
    return video, VIDEO_FPS


def _video_rates(processor, videos: List[List[Any]], rates: List[float]) -> Dict:
    """The processor kwargs that tell Qwen2.5-VL how far apart the frames are
    (its temporal positions scale with it): transformers 5 reads the videos'
    metadata and, without it, assumes 24 frames per second; 4.57 reads `fps`
    (default 2). Processors whose positions do not depend on it get nothing."""
    if "second_per_grid_ts" not in getattr(processor, "model_input_names", ()):
        return {}
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"video_metadata": [{"total_num_frames": len(v), "fps": r, "frames_indices": list(range(len(v)))}
                                   for v, r in zip(videos, rates)]}
    return {"fps": list(rates)}


def encode(processor, row: Row, device=None) -> Dict[str, torch.Tensor]:
    """The model inputs of one row: the chat template with one image/video
    placeholder per item, then the processor."""
    return encode_batch(processor, [row], device)


def encode_batch(processor, rows: List[Row], device=None) -> Dict[str, torch.Tensor]:
    """The model inputs of several rows as one left-padded batch (each row's
    images and video in its own place), as `encode` makes them for one."""
    texts, images, videos, rates = [], [], [], []
    for row in rows:
        content: List[Dict] = [{"type": "image"} for _ in row.images]
        if row.video is not None:
            content.append({"type": "video"})
        content.append({"type": "text", "text": question_text(row)})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True))
        images += [_image(p) for p in row.images]
        if row.video is not None:
            frames, rate = _frames(row.video)
            videos.append(frames)
            rates.append(rate)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
        kwargs.update(_video_rates(processor, videos, rates))
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generate continues each row from its last token
    try:
        enc = processor(text=texts, return_tensors="pt", padding=len(rows) > 1, **kwargs)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) if device is not None and isinstance(v, torch.Tensor) else v for k, v in enc.items()}


def load_model(path: str, dtype: str = "bfloat16", device_map: Optional[str] = "auto", attn: str = "sdpa"):
    """A checkpoint from a local path (or a hub id where the network allows),
    in eval mode. `device_map="auto"` spreads it over the GPUs (needs accelerate);
    {"": device} puts it on one device (with accelerate when it is installed);
    None keeps it on the CPU."""
    from transformers import AutoModelForImageTextToText

    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (bfloat16, float16, float32), got {dtype!r}")
    kw = dict(dtype=getattr(torch, dtype), attn_implementation=attn)
    move_to = None
    if device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = device_map
        elif isinstance(device_map, dict) and set(device_map) == {""}:
            move_to = device_map[""]  # one device: no accelerate needed
        else:
            raise ValueError(f"device_map={device_map!r} needs accelerate (pip install accelerate)")
    model = AutoModelForImageTextToText.from_pretrained(path, **kw).eval()
    return model.to(move_to) if move_to is not None else model


def load_processor(path: str, **kwargs):
    """The checkpoint's processor; `kwargs` (e.g. min_pixels, max_pixels) go to from_pretrained."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, **kwargs)


def decode_new(processor, output: torch.Tensor, prompt_len: int) -> List[str]:
    """The generated text of each row of `generate`'s output."""
    return [processor.decode(row[prompt_len:], skip_special_tokens=True).strip() for row in output]


def input_device(model) -> torch.device:
    """Where the model's inputs go: where its embedding runs (device_map may
    spread the rest; an offloaded embedding's weight is on the meta device)."""
    return execution_device(model.get_input_embeddings())


def synthetic_rows(n: int = 6, seed: int = 0) -> List[Row]:
    """A small built-in dataset of random-noise images for the embedded pair:
    sums to compute (numeric answers), one multiple-choice row, one row with two
    images and one with a video."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)

    def noise(h: int, w: int):
        return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))

    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 5, 2))
        row = Row(id=f"synthetic-{i}", question=f"what is {a} + {b} ?", images=[noise(56, 84)], answer=str(a + b))
        if i % 3 == 1:
            row.images.append(noise(84, 56))
        if i % 3 == 2:
            row.images, row.video = [], [noise(56, 56) for _ in range(4)]
            row.question = "how many frames are in this video ?"
            row.answer = "4"
        if i == n - 1:
            row.question, row.choices, row.answer = "which option is the sum of 1 + 1 ?", ["3", "2", "5", "4"], "B"
        rows.append(row)
    return rows

