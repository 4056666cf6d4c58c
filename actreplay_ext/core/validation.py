"""Checks that a configuration fits a model and that targets fit a prompt,
with errors that name both values."""

from __future__ import annotations

from typing import Dict, List

import torch

from ..config import ReplayConfig
from ..models.base import ModelAdapter
from .images import images_differ
from .prefill import Prefill
from .results import ReplayTargets

__all__ = ["check_config_for", "model_info", "target_config", "check_targets"]

#: The fields of ReplayConfig that targets depend on.
TARGET_FIELDS = ("layers", "entropy_threshold", "topv", "select", "rule", "topk_tokens", "thresholds", "inject_layer")


def target_config(cfg: ReplayConfig) -> Dict:
    """As JSON values (a layers list is a list), so saved and in-memory targets compare alike."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(cfg, k)) for k in TARGET_FIELDS)}


def model_info(adapter: ModelAdapter) -> Dict:
    """What targets record of the model they were made with."""
    return {"hidden_size": adapter.hidden_size, "vocab_size": adapter.vocab_size, "num_layers": adapter.num_layers}


def check_config_for(adapter: ModelAdapter, cfg: ReplayConfig, argument: str) -> None:
    """`cfg` fits the model given as `argument` (layers, topv)."""
    if cfg.depth > adapter.num_layers:
        raise ValueError(
            f"actreplay_ext: config.layers = {cfg.layers} exceeds the {adapter.num_layers} decoder layers "
            f"of the {argument} model (layers 0 .. {adapter.num_layers - 1})"
        )
    if cfg.topv > adapter.vocab_size:
        raise ValueError(
            f"actreplay_ext: config.topv = {cfg.topv} exceeds the vocabulary size V = {adapter.vocab_size} "
            f"of the {argument} model"
        )


def check_targets(targets: ReplayTargets, pre: Prefill, row_map: List[int], cfg: ReplayConfig,
                  adapter: ModelAdapter) -> None:
    """The targets were made for this prompt, model and configuration. `pre`
    holds the prompt's distinct rows and `row_map` how its batch repeats them;
    targets hold a batch's distinct rows too, so they fit any repetition of
    them (targets of one prompt serve its beams and Pass@K samples)."""
    mine = model_info(adapter)
    if targets.model is not None and targets.model != mine:
        raise ValueError(
            f"actreplay_ext: the targets were made with another model ({targets.model}); this model has {mine}"
        )
    ids = targets.input_ids
    if tuple(ids.shape) != tuple(pre.input_ids.shape) or not torch.equal(ids.cpu(), pre.input_ids.cpu()):
        raise ValueError(
            "actreplay_ext: the targets were computed for another prompt (input_ids differ: targets "
            f"{tuple(ids.shape)}, inputs {tuple(pre.input_ids.shape)}); compute them on the same inputs"
        )
    if images_differ(targets.images, pre.images):
        raise ValueError(
            "actreplay_ext: the targets were computed for other images (the same input_ids, other pixels); "
            "compute them on the same inputs"
        )
    want = target_config(cfg)
    got = targets.config
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        raise ValueError(
            f"actreplay_ext: the targets were computed with another configuration: {diff} (targets, config)")
