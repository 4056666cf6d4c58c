"""Weights that accelerate keeps offloaded, read as the module's own forward reads them.

With a `device_map` that offloads a module (to "disk", or to "cpu" when the
execution device is a GPU) or with `accelerate.cpu_offload`, the module's
parameters stay on the meta device (no data) between calls, and the accelerate
hook on the module (`module._hf_hook`) loads them in its `pre_forward` and
offloads them again in its `post_forward`. The logit lens reads the final norm's
and the unembedding's weights without calling those modules, so it must ask the
hook the same way.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["loaded_tensor", "execution_device"]


def loaded_tensor(module: nn.Module, name: str, what: str) -> torch.Tensor:
    """`module.<name>` with its data: the tensor itself, or where accelerate keeps it
    offloaded, the values its hook loads for a forward (on the hook's execution
    device). The hook offloads the module again at once; the returned tensor keeps
    the values as long as the caller holds it. `what` names the weight in errors."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        raise RuntimeError(
            f"actreplay_ext: {what} is on the meta device (no data) and no accelerate hook loads it; "
            "load the model's weights (e.g. from_pretrained) before replaying"
        )
    hook.pre_forward(module)  # what the module's forward gets: the weight from the hook's weights map
    try:
        tensor = getattr(module, name)
    finally:
        hook.post_forward(module, None)
    if tensor.device.type == "meta":
        raise RuntimeError(
            f"actreplay_ext: {what} is offloaded and its accelerate hook ({type(hook).__name__}) did not load it; "
            "keep the final norm and lm_head on a device (device_map) to replay this model"
        )
    return tensor


def execution_device(module: nn.Module) -> torch.device:
    """Where `module`'s forward computes, so where its inputs must be: the device of the
    accelerate hook that loads it (its weights may be on the meta device), else of its weights."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    tensor = next(module.parameters(), None)
    if tensor is None:
        return torch.device("cpu")
    if tensor.device.type == "meta":
        raise RuntimeError(f"actreplay_ext: the weights of {type(module).__name__} are on the meta device (no data) "
                           "and no accelerate hook runs it; load the model's weights before replaying")
    return tensor.device
