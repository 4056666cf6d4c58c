"""THE decoder-layer runner: the text decoder layers of a model run alone from
a captured layer-0 input (SPEC §5.1-5.2), as the model's own layer loop would
run them. Used by the targets, the optimisation loop, direct mode, the
analysis and the tests."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.utils.checkpoint

from ..models.base import BetweenLayers, LayerKwargs, ModelAdapter, PrefillState
from ..models.calls import batch_dim, layer_output, prefix_layer_kwargs
from .shared import evaluating

__all__ = ["LayerInputs", "run_layers", "lens_params", "loop_autograd", "no_inference_mode", "normal_tensors",
           "AUTO_CHECKPOINT_TOKENS"]

#: Prefix length from which checkpoint="auto" recomputes layers in the backward.
AUTO_CHECKPOINT_TOKENS = 4096


@dataclasses.dataclass
class LayerInputs:
    """Everything the decoder layers of one prefill take besides the hidden
    state: layer 0's keyword arguments (masks, rotary tables, positions), and
    where the family has them, what its layer loop adds between layers
    (`between`) and the arguments of layers that differ from layer 0's (`per_layer`)."""

    kwargs: Dict
    between: Optional[BetweenLayers] = None
    per_layer: Optional[LayerKwargs] = None

    def of_layer(self, layer: int) -> Dict:
        """The keyword arguments of decoder layer `layer`."""
        return self.kwargs if self.per_layer is None else self.per_layer.layer_kwargs(layer, self.kwargs)

    def after_layer(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The residual stream leaving `layer`, given its return value."""
        return out if self.between is None else self.between.after_layer(layer, out)

    def prefix(self, P: int) -> "LayerInputs":
        """The inputs of the first P positions, without a KV cache (SPEC §5.3)."""
        return LayerInputs(prefix_layer_kwargs(self.kwargs, P),
                           None if self.between is None else self.between.prefix(P),
                           None if self.per_layer is None else self.per_layer.prefix(P))

    def rows(self, index: List[int], batch: int) -> "LayerInputs":
        """The inputs of batch rows `index` of a batch of `batch` rows."""
        idx = torch.tensor(index)

        def pick(key, t):
            d = batch_dim(key, t)
            return t.index_select(d, idx.to(t.device)) if d is not None and t.shape[d] == batch else t

        kwargs = {}
        for key, v in self.kwargs.items():
            if isinstance(v, torch.Tensor):
                kwargs[key] = pick(key, v)
            elif isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
                kwargs[key] = type(v)(pick(key, t) for t in v)
            else:
                kwargs[key] = v
        return LayerInputs(kwargs, None if self.between is None else self.between.rows(index),
                           None if self.per_layer is None else self.per_layer.rows(index))


def run_layers(adapter: ModelAdapter, hidden: torch.Tensor, inputs: LayerInputs, start: int, stop: int,
               visit: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
               checkpoint: bool = False) -> torch.Tensor:
    """Decoder layers start .. stop-1 on `hidden` [B, T, D]; visit(l, h_in, h_out)
    after each. h_out is the residual stream leaving layer l as the whole model
    has it: the layer's return value plus what the model adds between layers
    (`inputs.between`, e.g. Qwen3-VL's deepstack features), i.e. the input of
    layer l + 1. With `checkpoint`, each layer's activations are recomputed in
    the backward. Returns the residual stream leaving layer stop-1."""
    layers = adapter.decoder_layers()
    for l in range(start, stop):
        kw = inputs.of_layer(l)
        if checkpoint and torch.is_grad_enabled():
            run = lambda x, layer=layers[l], kw=kw: layer_output(layer(x, **kw))  # noqa: E731
            out = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)
        else:
            out = layer_output(layers[l](hidden, **kw))
        out = inputs.after_layer(l, out)
        if visit is not None:
            visit(l, hidden, out)
        hidden = out
    return hidden


def lens_params(adapter: ModelAdapter):
    """(unembedding, lens norm weight, eps) of the model's logit lens, detached."""
    return adapter.unembed().detach(), adapter.lens_norm_weight().detach(), adapter.norm_eps()


@contextlib.contextmanager
def loop_autograd(model: torch.nn.Module) -> Iterator[None]:
    """The autograd scope of the replay loop: gradients on, outside inference
    mode, the model in eval mode with its weights taking no part (SPEC §5.6;
    `shared.evaluating`)."""
    with evaluating(model), torch.enable_grad(), no_inference_mode():
        yield


@contextlib.contextmanager
def no_inference_mode() -> Iterator[None]:
    """Leave `torch.inference_mode` (autograd cannot record inside it)."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            yield
    else:
        yield


def normal_tensors(x):
    """`x` (a tensor, or dicts, lists, tuples, dataclasses and PrefillStates of
    them) with inference tensors cloned into normal ones, which autograd may
    save for the backward; call outside inference mode. Other values unchanged."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, dict):
        return {k: normal_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(normal_tensors(v) for v in x)
    if isinstance(x, PrefillState) or dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = copy.copy(x)
        out.__dict__.update({k: normal_tensors(v) for k, v in vars(x).items()})
        return out
    return x
