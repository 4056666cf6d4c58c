"""Replay under torch.autocast("cpu", bfloat16), as the unpatched model runs under it:
the decoder layers run as autocast makes them, and the logit lens reads their outputs
in the model's own dtype (float32), as the operators compute without autocast
(tests/ops/test_ops_under_autocast.py). `patch`, `compute_targets` and `optimize` agree.
Before, every family failed with "expected scalar type Float but found BFloat16"."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import reference, tiny

FAMILIES = ["qwen2_vl", "llava", "gemma3", "qwen3_vl"]
CPU_BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _family(name):
    fam = tiny.FAMILIES_TINY[name]
    if not fam.available:
        pytest.skip(f"transformers has no {fam.class_name}")
    return fam


def autocast_lens_entropy(model, inputs, layers):
    """The float32 lens entropy (the oracle) of every visual token's output of layers
    0 .. layers-1, the decoder layers run under CPU bfloat16 autocast as the engine runs them."""
    ad = ar.get_adapter(model)
    outs = []
    with torch.no_grad(), torch.autocast(**CPU_BF16):
        pre = ar.core.capture_prefill(ad, inputs)
        P = pre.prefix_len
        ar.core.run_layers(ad, pre.hidden0[:, :P], pre.layers.prefix(P), 0, layers,
                           lambda l, h_in, h_out: outs.append(h_out[pre.visual[:, :P]]))
    unembed, norm_weight, eps = ar.core.lens_params(ad)
    return torch.stack([reference.lens_entropy(o.float(), unembed, norm_weight, eps)[0] for o in outs])


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_under_cpu_autocast(family):
    fam = _family(family)
    base, rlvr = fam.pair()
    inputs = fam.prompt(base, "one_image")
    cfg = ar.ReplayConfig(layers=3, lr=fam.lr, steps=3)
    with torch.autocast(**CPU_BF16):
        unpatched = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
        targets = ar.compute_targets(base, inputs, cfg)
        result = ar.optimize(rlvr, inputs, targets, cfg)
        with ar.patch(rlvr, base=base, config=cfg) as handle:
            patched = rlvr.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert patched.shape == unpatched.shape
    # the lens in float32 on the autocast layers' outputs (a bfloat16 lens is ~1e-2 off)
    want = autocast_lens_entropy(base, inputs, cfg.depth)
    assert torch.allclose(targets.entropy, want, rtol=1e-5, atol=1e-5)
    assert sum(result.selected) > 0 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.deltas.dtype == torch.float32 and float(result.deltas.abs().max()) > 0
    assert handle.last.losses == result.losses and torch.equal(handle.last.deltas, result.deltas)
