"""Device placement on a GPU: base and RLVR on different devices, and both
loaded with device_map="auto". Targets and offsets move to where each layer
runs. Skipped without a GPU (the CPU device_map case is tests/core/test_device_map.py)."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

CFG = dict(layers=3, lr=1e-3, steps=5)
# float32 on the GPU against the CPU, with TF32 off: PyTorch leaves cuDNN's TF32 on
# by default (torch.backends.cudnn.allow_tf32), and the vision tower's Conv3d then
# rounds its inputs to 10 mantissa bits; with it off CPU and CUDA agreed to 3.4e-6
# (H200). The default settings are bounded separately below.
TOL = 1e-4
# TF32 on (the defaults): the offsets moved by 0.9-1.3e-3 relative on an H200.
TOL_TF32 = 5e-3


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_reference():
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    inputs = tiny.make_inputs(rlvr, images=[(8, 8), (4, 6)], seed=2)
    cfg = ar.ReplayConfig(**CFG)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=4, do_sample=False)
    return base, rlvr, inputs, handle.last, out


def rel(a, b):
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("base_device,rlvr_device", [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")])
def test_cuda_base_and_rlvr_on_different_devices(cpu_reference, no_tf32, base_device, rlvr_device):
    base, rlvr, inputs, expected, _ = cpu_reference
    import copy

    b, r = copy.deepcopy(base).to(base_device), copy.deepcopy(rlvr).to(rlvr_device)
    moved = {k: v.to(rlvr_device) for k, v in inputs.items()}
    with ar.patch(r, base=b, config=ar.ReplayConfig(**CFG)) as handle:
        r.generate(**moved, max_new_tokens=4, do_sample=False)
    got = handle.last
    assert got.selected == expected.selected
    assert rel(got.deltas, expected.deltas) <= TOL
    assert got.deltas.device.type == rlvr_device  # the offsets live where layer 0 runs
    # targets computed on the base's device are usable for the RLVR model's
    targets = ar.compute_targets(b, {k: v.to(base_device) for k, v in inputs.items()}, ar.ReplayConfig(**CFG))
    result = ar.optimize(r, moved, targets, ar.ReplayConfig(**CFG))
    assert rel(result.deltas, expected.deltas) <= TOL


def test_cuda_device_map_auto(cpu_reference, no_tf32, tmp_path):
    pytest.importorskip("accelerate")
    base, rlvr, inputs, expected, _ = cpu_reference
    cls = tiny.model_class("qwen2_5_vl")
    loaded = []
    for name, model in (("base", base), ("rlvr", rlvr)):
        model.save_pretrained(tmp_path / name)
        m = cls.from_pretrained(tmp_path / name, device_map="auto", dtype=torch.float32,
                                attn_implementation="eager").eval()
        # placement by the parameters themselves (transformers 5 sets no hf_device_map for one GPU)
        assert {p.device.type for p in m.parameters()} == {"cuda"}
        loaded.append(m)
    b, r = loaded
    tiny.finish(b, 1.0), tiny.finish(r, 1.0)  # the saved weights are already sharpened
    dev = r.get_input_embeddings().weight.device
    with ar.patch(r, base=b, config=ar.ReplayConfig(**CFG)) as handle:
        r.generate(**{k: v.to(dev) for k, v in inputs.items()}, max_new_tokens=4, do_sample=False)
    assert handle.last.selected == expected.selected
    assert rel(handle.last.deltas, expected.deltas) <= TOL


def test_cuda_offsets_with_the_default_tf32_settings(cpu_reference):
    """With PyTorch's defaults (cuDNN TF32 on) the GPU offsets are TF32-close to the
    CPU's, not float32-close: README, "Reproducible GPU offsets"."""
    base, rlvr, inputs, expected, _ = cpu_reference
    import copy

    assert torch.backends.cudnn.allow_tf32  # the default this test is about
    b, r = copy.deepcopy(base).cuda(), copy.deepcopy(rlvr).cuda()
    with ar.patch(r, base=b, config=ar.ReplayConfig(**CFG)) as handle:
        r.generate(**{k: v.cuda() for k, v in inputs.items()}, max_new_tokens=4, do_sample=False)
    assert handle.last.selected == expected.selected
    assert rel(handle.last.deltas, expected.deltas) <= TOL_TF32
