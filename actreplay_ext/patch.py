"""`patch(model, base=...)`: Activation Replay inside `generate`, through hooks.

Hooks on the RLVR model, all removed by `ReplayHandle.remove()`:
  * a forward pre-hook on the model records the prompt of each forward call
    (input ids, pixel inputs) and whether the call is a prefill (empty KV cache);
  * a forward pre-hook on the vision tower records its inputs (transformers 5.x
    encodes images in `generate` before the first forward and passes only the
    features, so the base model's pixels are recovered from here);
  * for families whose layer loop adds per-prefill state between decoder layers
    (Qwen3-VL's deepstack features), a forward pre-hook on the module that
    receives it (`adapter.extras_module()`) records it for the replay loop;
  * a forward pre-hook on decoder layer 0 runs the replay at each multimodal
    prefill, from the layer-0 input the model has just built, and returns that
    input with the offsets added. Decode steps pass through untouched.
  * for a mid replay (`inject_layer` m > 0) the offsets belong to the input of
    layer m: a pre-hook there adds them, in the same prefill.
"""

from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Optional

import torch

from .adapters import check_pair, get_adapter
from .config import ReplayConfig
from .engine import (ReplayResult, ReplayTargets, _check_config_for, add_offsets, optimize_from_prefill,
                     targets_from_prefill)
from .direct import DirectPlan, plan_direct, substitute
from .prefill import Prefill, cache_length, capture_prefill, in_internal_forward, internal_forward, record_extras

__all__ = ["patch", "ReplayHandle"]

log = logging.getLogger("actreplay_ext")


class ReplayHandle:
    """The installed hooks of one patched model. Use as a context manager or
    call `remove()`. `last` is the ReplayResult of the latest prompt."""

    def __init__(self, model: torch.nn.Module, base: Optional[torch.nn.Module] = None,
                 config: Optional[ReplayConfig] = None, targets: Optional[ReplayTargets] = None,
                 fixed_result: Optional[ReplayResult] = None):
        self.model = model
        self.adapter = get_adapter(model, "model")
        self.base = base
        self.base_adapter = get_adapter(base, "base") if base is not None else None
        self.config = config or ReplayConfig()
        if self.base_adapter is not None:
            check_pair(self.adapter, self.base_adapter)
            _check_config_for(self.base_adapter, self.config, "base")
        if fixed_result is None:
            _check_config_for(self.adapter, self.config, "RLVR")
        self._targets = targets
        self._fixed = fixed_result
        self.last: Optional[ReplayResult] = None
        self._call: Optional[Dict] = None
        self._visual_calls: List = []
        self._extras = None  # between-layer extras of the running forward (Qwen3-VL deepstack)
        self._plan: Optional[DirectPlan] = None  # direct mode: substitutions of the running prefill
        self._pending = None  # mid replay: (visual mask, offsets) for the input of layer inject_layer
        self._handles = []
        self._install()
        if base is None and targets is None and fixed_result is None:
            warnings.warn(
                "actreplay_ext.patch: no base model and no targets given, so generation is unchanged; "
                "pass base=... or call handle.set_targets(...)",
                stacklevel=3,
            )

    # ------------------------------------------------------------ lifecycle
    def _install(self):
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
            tower = self.adapter.vision_tower()
            if tower is not None:
                self._handles.append(tower.register_forward_pre_hook(self._on_vision, with_kwargs=True))
            extras = record_extras(self.adapter, self._on_extras)
            if extras is not None:
                self._handles.append(extras)
            layers = self.adapter.decoder_layers()
            self._handles.append(layers[0].register_forward_pre_hook(self._on_layer0, with_kwargs=True))
            if self._inject_layer() > 0:
                self._handles.append(layers[self._inject_layer()].register_forward_pre_hook(
                    self._on_inject_layer, with_kwargs=True))
            if self.config.mode == "direct":  # substitution reaches layers 1 .. L-1 too
                for l in range(1, self.config.layers):
                    hook = (lambda l: lambda mod, args, kwargs: self._on_direct_layer(l, args, kwargs))(l)
                    self._handles.append(layers[l].register_forward_pre_hook(hook, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before patch()."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._call = None
        self._visual_calls = []
        self._extras = None
        self._plan = None
        self._pending = None

    def reset(self) -> None:
        """Forget per-conversation state (the pending call, recorded vision inputs, `last`)."""
        self._call = None
        self._visual_calls = []
        self._extras = None
        self._plan = None
        self._pending = None
        self.last = None

    def set_targets(self, targets: Optional[ReplayTargets]) -> None:
        self._targets = targets

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # ---------------------------------------------------------------- hooks
    def _on_vision(self, module, args, kwargs):
        if not in_internal_forward():
            self._visual_calls.append((args, dict(kwargs)))
        return None

    def _on_extras(self, extras):
        if not in_internal_forward():
            self._extras = extras

    def _on_forward(self, module, args, kwargs):
        if in_internal_forward():
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        prefill = cache_length(kwargs) == 0
        self._plan = None
        self._extras = None
        if not prefill:
            self._visual_calls = []
        self._call = {"kwargs": kwargs, "input_ids": ids, "prefill": prefill}
        return None

    def _on_layer0(self, module, args, kwargs):
        if in_internal_forward():
            return None
        call, self._call = self._call, None
        extras, self._extras = self._extras, None
        if call is None or not call["prefill"]:
            return None
        if call["input_ids"] is None:
            # Without ids the visual positions are unknown: say so rather than
            # generate without replay in silence.
            self.last = ReplayResult(torch.zeros(0, 0), [], [], [], {}, note="no input_ids: nothing replayed")
            warnings.warn("actreplay_ext: a prefill came without input_ids (inputs_embeds only), so the "
                          "visual positions are unknown and nothing was replayed; pass input_ids", stacklevel=2)
            return None
        visual_calls, self._visual_calls = self._visual_calls, []
        ids = call["input_ids"]
        hidden = args[0] if args else kwargs["hidden_states"]
        visual = self.adapter.visual_mask(ids)

        if self._fixed is not None:
            return self._offset(args, kwargs, hidden, visual, self._fixed.flat_deltas())
        elif self.config.mode == "direct":
            new = self._plan_direct(call, visual_calls, hidden, kwargs, ids, visual, extras)
            if new is None:
                return None
        else:
            if not bool(visual.any()):
                self.last = ReplayResult(torch.zeros(0, hidden.shape[-1]), [], [0] * self.config.layers,
                                         [0] * ids.shape[0], {}, note="no visual tokens: nothing replayed",
                                         input_ids=ids)
                return None
            targets = self._targets_for(call, visual_calls)
            if targets is None:
                return None
            pre = Prefill(hidden.detach(), kwargs, ids, visual, call["kwargs"].get("attention_mask"), extras)
            with internal_forward():
                result = optimize_from_prefill(self.adapter, pre, targets, self.config)
            self.last = result
            log.info("actreplay: replayed %d visual tokens, loss %.4g -> %.4g",
                     sum(result.n_visual), result.losses[0], result.losses[-1])
            return self._offset(args, kwargs, hidden, visual, result.flat_deltas())
        return _with_hidden(args, kwargs, new)

    def _inject_layer(self) -> int:
        if self._fixed is not None:
            return self._fixed.inject_layer
        return self.config.inject_layer if self.config.mode == "tokens" else 0

    def _offset(self, args, kwargs, hidden, visual, deltas):
        """Add the offsets to this layer-0 input, or keep them for layer inject_layer's."""
        if self._inject_layer() > 0:
            self._pending = (visual, deltas)
            return None
        return _with_hidden(args, kwargs, add_offsets(hidden, visual, deltas))

    def _on_inject_layer(self, module, args, kwargs):
        if self._pending is None or in_internal_forward():
            return None
        (visual, deltas), self._pending = self._pending, None
        hidden = args[0] if args else kwargs["hidden_states"]
        return _with_hidden(args, kwargs, add_offsets(hidden, visual, deltas))

    def _plan_direct(self, call, visual_calls, hidden, kwargs, ids, visual, extras):
        if self.base_adapter is None:
            return None
        rlvr_pre = Prefill(hidden.detach(), kwargs, ids, visual, call["kwargs"].get("attention_mask"), extras)
        with internal_forward():
            base_pre = capture_prefill(self.base_adapter, self._base_prompt(call, visual_calls))
            plan = plan_direct(self.adapter, rlvr_pre, self.base_adapter, base_pre, self.config)
        self.last = ReplayResult(torch.zeros(0, hidden.shape[-1]), [], plan.counts, visual.sum(1).tolist(), {},
                                 note="direct substitution", input_ids=ids)
        self._plan = plan if self.config.layers > 1 else None
        return substitute(hidden, plan, 0)

    def _on_direct_layer(self, layer, args, kwargs):
        plan = self._plan
        if plan is None or in_internal_forward():
            return None
        if layer == self.config.layers - 1:
            self._plan = None
        hidden = args[0] if args else kwargs["hidden_states"]
        return _with_hidden(args, kwargs, substitute(hidden, plan, layer))

    # -------------------------------------------------------------- targets
    def _targets_for(self, call: Dict, visual_calls: List) -> Optional[ReplayTargets]:
        if self.base_adapter is None:
            return self._targets  # set_targets(); optimize_from_prefill checks the prompt
        with internal_forward():
            pre = capture_prefill(self.base_adapter, self._base_prompt(call, visual_calls))
            return targets_from_prefill(self.base_adapter, pre, self.config)

    def _base_prompt(self, call: Dict, visual_calls: List) -> Dict:
        prompt = self.adapter.prompt_from_forward(call["kwargs"], visual_calls)
        return {k: (v.to(self._base_device()) if isinstance(v, torch.Tensor) else v) for k, v in prompt.items()}

    def _base_device(self):
        return getattr(self.base, "device", None) or next(self.base.parameters()).device


def _with_hidden(args, kwargs, hidden):
    """A pre-hook's return value that replaces the layer's hidden-state input."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


def patch(model: torch.nn.Module, base: Optional[torch.nn.Module] = None, config: Optional[ReplayConfig] = None,
          targets: Optional[ReplayTargets] = None) -> ReplayHandle:
    """Make `model.generate` (and every forward) run Activation Replay at each new
    multimodal prefill, against `base` (or fixed `targets`)."""
    return ReplayHandle(model, base=base, config=config, targets=targets)
