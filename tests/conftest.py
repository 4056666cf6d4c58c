import pytest
import torch

import actreplay_ext

HAS_CUDA = torch.cuda.is_available() and actreplay_ext.build_info()["cuda"]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """||out - ref|| / ||ref|| in float64. The denominator is floored at `floor`
    so that quantities that are exactly zero compare absolutely."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / max(float(ref.norm()), floor))


TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}
