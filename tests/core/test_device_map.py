"""Models loaded with accelerate's device_map keep their hooks and give the same replay."""

import pytest
import torch
from helpers import replay

import actreplay_ext as ar
from actreplay_ext import tiny

pytest.importorskip("accelerate")


def test_device_map_models(tmp_path):
    base, rlvr = tiny.make_pair("qwen2_vl")
    inputs = tiny.make_inputs(base, images=[(8, 8)])
    cfg = ar.ReplayConfig(layers=3, lr=1e-3, steps=4)
    expected = replay(base, rlvr, inputs, cfg)

    cls = tiny.model_class("qwen2_vl")
    loaded = []
    for name, model in (("base", base), ("rlvr", rlvr)):
        model.save_pretrained(tmp_path / name)
        # Layer 2 offloaded to disk: accelerate hooks it to load its weights on each call.
        device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                      "model.language_model.layers.0": "cpu", "model.language_model.layers.1": "cpu",
                      "model.language_model.layers.2": "disk", "model.language_model.layers.3": "cpu",
                      "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
        m = cls.from_pretrained(tmp_path / name, device_map=device_map, offload_folder=str(tmp_path / f"off-{name}"),
                                dtype=torch.float32, attn_implementation="eager").eval()
        assert hasattr(m.model.language_model.layers[2], "_hf_hook")  # accelerate's hooks are in place
        loaded.append(m)
    base_dm, rlvr_dm = loaded
    got = ar.optimize(rlvr_dm, inputs, ar.compute_targets(base_dm, inputs, cfg), cfg)
    assert torch.allclose(got.deltas, expected.deltas, rtol=0, atol=1e-6)
    with ar.patch(rlvr_dm, base=base_dm, config=cfg) as handle:
        rlvr_dm.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.allclose(handle.last.deltas, expected.deltas, rtol=0, atol=1e-6)
    assert hasattr(rlvr_dm.model.language_model.layers[2], "_hf_hook")  # and still there after remove()
