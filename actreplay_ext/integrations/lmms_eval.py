"""Activation Replay as an lmms-eval model: ``python -m lmms_eval --model actreplay``.

lmms-eval 0.7 finds it through the entry point group ``lmms_eval.models``
(pyproject.toml -> `lmms_manifest`) once this package and its ``lmms`` extra are
installed. ``--model_args`` takes:

* ``rlvr`` (required), ``base`` (required when replaying): local checkpoint
  directories or hub ids; ``processor`` (default: ``rlvr``'s), ``min_pixels``,
  ``max_pixels`` (the Qwen processors' image budget);
* ``dtype``, ``device_map``, ``attn``: how the pair loads, as for ``actreplay run``;
* ``preset`` (default ``mm-eureka-7b``) and any ReplayConfig field on top of it
  (``layers``, ``lr``, ``steps``, ``optimizer``, ``tol``, ``inject_layer``, ...;
  a list as ``layers=[0,2]``);
* ``replay`` (default true): false evaluates the RLVR model alone, through the
  same code; a task may override it per request with the generation kwarg
  ``replay`` (so one run can score both; the base loads only with replay=true);
* ``save_offsets``: a directory for each generate call's ReplayResult
  (safetensors, one file per call, also when a task's ``repeats`` asks for a
  document again: `lmms_files`) and ``replay.rank<R>.jsonl``, one line per
  request, naming its file.

Every argument is checked, and the pair's configs against the replay
configuration, before any weight loads. Note that lmms-eval 0.7 reports a
failed evaluation (a bad argument included) on its log and still exits 0: check
its results file.

`generate_until` takes images (PIL images or paths), several per request, and
one video (a file path, as lmms-eval's video tasks give it, decoded by
`actreplay_ext.tools.data.decode_video`); the task's generation kwargs
(as lmms-eval's qwen2_5_vl reads them: ``max_new_tokens``, default the model
arg ``max_new_tokens`` or 32768; ``temperature`` > 0 samples, with ``top_p``,
else greedy; ``num_beams``; ``until`` cuts the answer at the first stop string,
except the "\n\n" lmms-eval adds to every task); requests with the same generation kwargs are batched
``batch_size`` at a time. `loglikelihood` is not supported: the replay is defined on
generation (SPEC §3), so multiple-choice-by-likelihood tasks raise.
Data parallel under ``accelerate launch``/``torchrun`` works as lmms-eval's HF
models do: each rank loads the pair on its own device and lmms-eval shards the
requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError:  # pragma: no cover - the message is the point
    raise ImportError("actreplay_ext.integrations.lmms_eval needs lmms-eval: pip install 'actreplay_ext[lmms]'") \
        from None

from ..config import PRESETS, ReplayConfig
from ..tools import checks, console, data
from ..tools.console import UsageError, loss_change, preset_with
from . import lmms_files

__all__ = ["ActReplay", "parse_model_args"]

log = logging.getLogger("actreplay_ext")

_REPLAY_FIELDS = {f.name: f for f in dataclasses.fields(ReplayConfig) if f.name != "callback"}
_LOAD_ARGS = {"rlvr": None, "base": None, "processor": None, "min_pixels": None, "max_pixels": None,
              "dtype": None, "device_map": None, "attn": "sdpa", "preset": "mm-eureka-7b", "replay": True,
              "save_offsets": None, "max_new_tokens": None}
ATTENTION = ("eager", "sdpa", "flash_attention_2")
DTYPES = ("bfloat16", "float16", "float32")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
DEFAULT_MAX_NEW_TOKENS = 32768  # as lmms-eval's qwen2_5_vl, for a task that sets none: reasoning runs long


def _bad(name: str, problem: str) -> UsageError:
    return UsageError(f"actreplay (lmms-eval --model_args): '{name}' {problem}")


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise _bad(name, f"must be true or false, got {value!r}")


def _replay_value(name: str, value):
    """A ReplayConfig field from lmms-eval's parsing (bools, ints and floats
    already converted; '-1' arrives as -1.0, 'None' as a string, a list as text)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", "null"):
            return None
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise _bad(name, f"must be a JSON list like [0,2], got {value!r}") from None
        if name in ("normalize", "compile"):
            return _as_bool(name, text)
        if name == "checkpoint":
            return text if text == "auto" else _as_bool(name, text)
        return text
    if isinstance(value, float) and value.is_integer() and name in ("layers", "steps", "topv", "inject_layer"):
        return int(value)
    return value


def parse_model_args(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], ReplayConfig]:
    """(the loading arguments, the replay configuration) from ``--model_args``;
    a UsageError naming the argument for anything unknown or invalid."""
    unknown = sorted(set(kwargs) - set(_LOAD_ARGS) - set(_REPLAY_FIELDS))
    if unknown:
        raise _bad(unknown[0], f"is not an argument of this model; valid: {', '.join(sorted(_LOAD_ARGS))} and the "
                               f"ReplayConfig fields {', '.join(_REPLAY_FIELDS)}")
    given = {k: None if isinstance(v, str) and v.strip().lower() in ("none", "null") else v  # lmms-eval keeps 'None'
             for k, v in kwargs.items() if k in _LOAD_ARGS}
    load = {**_LOAD_ARGS, **{k: v for k, v in given.items() if v is not None}}
    load["replay"] = _as_bool("replay", load["replay"])
    if load["preset"] not in PRESETS:
        raise _bad("preset", f"must be one of {', '.join(sorted(PRESETS))}, got {load['preset']!r}")
    if not isinstance(load["rlvr"], str) or not load["rlvr"]:
        raise _bad("rlvr", "is required: the RLVR checkpoint (a directory or a hub id)")
    if load["replay"] and not isinstance(load["base"], str):
        raise _bad("base", "is required to replay: the base checkpoint (or give replay=false for the baseline)")
    for name in ("min_pixels", "max_pixels", "max_new_tokens"):
        if load[name] is not None and (isinstance(load[name], bool) or not isinstance(load[name], (int, float))
                                       or load[name] <= 0 or load[name] != int(load[name])):
            raise _bad(name, f"must be a positive int, got {load[name]!r}")
    if load["min_pixels"] and load["max_pixels"] and load["min_pixels"] > load["max_pixels"]:
        raise _bad("min_pixels", f"({load['min_pixels']}) must be at most max_pixels ({load['max_pixels']})")
    if load["attn"] not in ATTENTION:
        raise _bad("attn", f"must be one of {', '.join(ATTENTION)}, got {load['attn']!r}")
    if load["dtype"] is not None and load["dtype"] not in DTYPES:
        raise _bad("dtype", f"must be one of {', '.join(DTYPES)}, got {load['dtype']!r}")
    if load["processor"] is not None and checks.is_local(load["processor"]) and not os.path.isdir(load["processor"]):
        raise _bad("processor", f"{load['processor']!r} is not a directory (or a hub id)")
    overrides = {k: _replay_value(k, v) for k, v in kwargs.items() if k in _REPLAY_FIELDS}
    try:
        cfg = preset_with(load["preset"], overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"actreplay (lmms-eval --model_args) preset={load['preset']} {overrides}: {e}") from None
    if cfg.mode == "direct" and load["save_offsets"]:
        raise _bad("save_offsets", f"has nothing to save: preset {load['preset']!r} is a direct substitution")
    return load, cfg


class ActReplay(lmms):
    """The RLVR model of a base/RLVR pair, generating with Activation Replay
    (`actreplay_ext.patch`) or, with ``replay=false``, without it."""

    is_simple = True

    def __init__(self, batch_size=1, device: Optional[str] = None, max_batch_size=None, **model_args) -> None:
        super().__init__()
        load, self.config = parse_model_args(model_args)
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise _bad("batch_size", f"must be an int >= 1, got {batch_size!r}") from None
        if self._batch_size < 1:
            raise _bad("batch_size", f"must be an int >= 1, got {batch_size!r}")
        self.replay = load["replay"]
        self.max_new_tokens = int(load["max_new_tokens"] or DEFAULT_MAX_NEW_TOKENS)
        configs = {"rlvr": checks.checkpoint_config(load["rlvr"], "rlvr")}
        if self.replay:  # replay=false: the RLVR model alone, whatever the replay configuration says
            configs["base"] = checks.checkpoint_config(load["base"], "base")
            checks.check_pair_configs(configs["base"], configs["rlvr"], self.config)  # before any weight loads
        self._device, device_map = self._placement(device, load["device_map"])
        self.save_offsets = load["save_offsets"]
        self._saved_calls = 0  # generate calls whose offsets were saved: the number in their file's name
        if self.save_offsets:
            self._claim_save_offsets()
        dtype = load["dtype"] or ("bfloat16" if self._device.type == "cuda" else "float32")
        kw = dict(dtype=dtype, device_map=device_map, attn=load["attn"])
        self._rlvr = data.load_model(load["rlvr"], **kw)
        self._base = data.load_model(load["base"], **kw) if self.replay else None  # replay=false: the RLVR alone
        pixels = {k: int(load[k]) for k in ("min_pixels", "max_pixels") if load[k] is not None}
        self.processor = data.load_processor(load["processor"] or load["rlvr"], **pixels)
        self.results: List[Dict] = []  # one entry per request: what the replay did

    def _claim_save_offsets(self) -> None:
        """save_offsets is this run's: a rank's log from an earlier run there would
        sit beside files this run overwrites (each rank checks its own)."""
        checks.output_dir(self.save_offsets, "save_offsets")
        mine = lmms_files.log_file(self.save_offsets, self.rank)
        if os.path.exists(mine):
            raise _bad("save_offsets", f"{self.save_offsets!r} holds {os.path.basename(mine)} of an earlier run; "
                                       "give another directory (or empty it)")

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model(self):
        return self._rlvr

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _placement(self, device: Optional[str], device_map):
        """This rank's device and the pair's device_map: one device per rank
        under accelerate/torchrun (lmms-eval shards the requests), otherwise
        `device`, or every GPU (device_map='auto'), or the CPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()  # sets up the process group lmms-eval gathers over
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            local = self.accelerator.local_process_index
            here = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
            return here, {"": str(here)}
        if device_map is not None:
            first = "cuda:0" if torch.cuda.is_available() else "cpu"
            return torch.device(first), device_map
        if device is not None and device != "auto":
            return torch.device(device), {"": str(device)}
        gpu = torch.cuda.is_available()
        return torch.device("cuda:0" if gpu else "cpu"), ("auto" if gpu else None)

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: List[Instance]) -> List[str]:
        answers: List[Optional[str]] = [None] * len(requests)
        groups: Dict[str, List[int]] = {}
        for i, request in enumerate(requests):  # one batch: one task, one split, one set of generation kwargs
            key = json.dumps([request.args[4], request.args[5], request.args[1]], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self._batch_size):
                chunk = indices[start:start + self._batch_size]
                for i, text in zip(chunk, self._generate([requests[i] for i in chunk])):
                    answers[i] = text
        return answers

    def _generate(self, requests: List[Instance]) -> List[str]:
        import actreplay_ext as ar

        rows = [self._row(request) for request in requests]
        gen, until, replay = generation_kwargs(requests[0].args[1], self.replay, self.max_new_tokens)
        inputs = data.encode_batch(self.processor, rows, data.input_device(self._rlvr))
        if replay and self._base is None:
            raise _bad("replay", "is false, so no base model was loaded, and a task asks for the replay "
                                 "(generation kwarg replay=true); give replay=true and base=...")
        last = None
        if replay:
            with ar.patch(self._rlvr, base=self._base, config=self.config) as handle:
                out = self._rlvr.generate(**inputs, **gen)
            last = handle.last
        else:
            out = self._rlvr.generate(**inputs, **gen)
        texts = [_cut(t, until) for t in data.decode_new(self.processor, out, inputs["input_ids"].shape[1])]
        self._record(requests, last, replay)
        return texts

    def _row(self, request: Instance) -> data.Row:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        if visuals is None or isinstance(visuals, (str, dict)) or hasattr(visuals, "convert"):
            visuals = [] if visuals is None else [visuals]  # one visual, not in a list
        images, videos = [], []
        for v in visuals:
            if v is None:
                continue
            if isinstance(v, str) and (v.lower().endswith(VIDEO_SUFFIXES) or os.path.isdir(v)):
                videos.append(v)
            elif isinstance(v, str) or hasattr(v, "convert"):  # an image path or a PIL image
                images.append(v)
            else:
                raise ValueError(f"actreplay: {task} doc {doc_id}: a visual of type {type(v).__name__} (audio, or a "
                                 "video as a dict) is not supported; images and video files are")
        if len(videos) > 1:
            raise ValueError(f"actreplay: {task} doc {doc_id} has {len(videos)} videos; one per request is supported")
        # lmms-eval's image placeholder in the text: the chat template places the images itself
        text = context.replace("<image>", "").strip() if isinstance(context, str) else str(context)
        return data.Row(id=f"{task}/{doc_id}", question=text, images=images, video=videos[0] if videos else None)

    def _record(self, requests: List[Instance], last, replay: bool) -> None:
        """What the replay did, per request: on the log, in `results`, and with
        save_offsets in DIR (the generate call's ReplayResult, a JSONL line each).
        A batch's losses and selected counts are the batch's (summed over its
        rows: `batch_losses`, `batch_selected`); `n_visual` is the request's own.
        The copies lmms-eval adds to even out the ranks are not recorded."""
        path = None
        task, split = requests[0].args[4], requests[0].args[5]
        if last is not None and self.save_offsets:
            path = lmms_files.offsets_file(self.save_offsets, task, split, [r.args[3] for r in requests], self.rank,
                                           self._saved_calls)
            with console.writing("save_offsets", path):
                last.save(path)
            self._saved_calls += 1
        for row, request in enumerate(requests):
            if (request.metadata or {}).get("__padding_only__"):
                continue
            entry = {"task": task, "split": split, "doc_id": request.args[3], "replay": replay}
            if last is not None:
                n_visual = list(last.n_visual)
                entry.update(n_visual=n_visual[row] if row < len(n_visual) else 0, batch_rows=len(requests),
                             batch_row=row, batch_losses=list(last.losses), batch_selected=list(last.selected),
                             note=last.note, offsets=path)
                log.info("actreplay: %s doc %s: %s", task, entry["doc_id"], _describe(last, self.config))
            self.results.append(entry)
            if self.save_offsets:
                with open(lmms_files.log_file(self.save_offsets, self.rank), "a") as f:
                    f.write(json.dumps(entry) + "\n")

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        raise NotImplementedError("actreplay: loglikelihood is not supported (the replay acts on generation); "
                                  "evaluate generate_until tasks")

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("actreplay: multi-round generation is not supported; evaluate generate_until tasks")


_WARNED = set()


def generation_kwargs(task_kwargs: Dict, replay_default: bool, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    """(HF generate kwargs, stop strings, whether to replay) from a task's
    generation kwargs, as lmms-eval's qwen2_5_vl reads them: temperature > 0
    samples (with top_p), otherwise greedy whatever do_sample says; the "\n\n"
    stop that lmms-eval adds to every task without one is dropped (it would cut
    a reasoning answer at its first paragraph); max_new_tokens defaults to the
    model arg (32768)."""
    kw = dict(task_kwargs or {})
    until = kw.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    until = [stop for stop in until if stop != "\n\n"]
    replay = _as_bool("generation kwarg replay", kw.pop("replay", replay_default))
    temperature = float(kw.pop("temperature", 0.0) or 0.0)
    kw.pop("do_sample", None)  # temperature decides, as in lmms-eval's qwen2_5_vl
    tokens = kw.pop("max_new_tokens", None)
    gen = {"max_new_tokens": int(tokens) if tokens is not None else max_new_tokens, "do_sample": temperature > 0}
    top_p = kw.pop("top_p", None)
    if temperature > 0:
        gen["temperature"] = temperature
        if top_p is not None:
            gen["top_p"] = float(top_p)
    beams = kw.pop("num_beams", None)
    if beams is not None:
        gen["num_beams"] = int(beams)
    unused = tuple(sorted(kw))
    if unused and unused not in _WARNED:
        _WARNED.add(unused)
        log.warning("actreplay: generation kwargs %s are not used", list(unused))
    return gen, until, replay


def _cut(text: str, until: List[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def _describe(result, cfg: ReplayConfig) -> str:
    if not result.replayed or not result.losses:
        return result.note or "nothing replayed"
    return f"{sum(result.n_visual)} visual tokens, selected {result.selected}, loss {loss_change(cfg, result.losses)}"
