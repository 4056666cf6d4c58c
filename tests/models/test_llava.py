"""LLaVA-1.5 style (CLIP vision tower, Llama text model) beyond what every
family must satisfy (tests/models/test_families.py): Pass@K on a two-image
prompt, on transformers 4.57.x and 5.x."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny

transformers = pytest.importorskip("transformers")

FAM = tiny.FAMILIES_TINY["llava"]
TOKENS_PER_IMAGE = tiny.LLAVA_TOKENS_PER_IMAGE


@pytest.fixture(scope="module")
def pair():
    return FAM.pair()


def test_patch_with_num_return_sequences_two_images(pair):
    """transformers 5.x generate encodes each image once and repeats the encoded
    images for the repeated prompt rows; the base prompt must get the pixels in
    the order the RLVR rows saw them (5.18 gives a two-image prompt's rows the
    images [a, a] and [b, b]), else the rows of the two prefills disagree.
    (The one-image prompt: test_families.py::test_pass_at_k_optimises_once.)"""
    base, rlvr = pair
    inputs = tiny.llava_inputs(base, n_images=2)
    cfg = ar.ReplayConfig(layers=3, lr=FAM.lr, steps=5)
    torch.manual_seed(0)
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        out = rlvr.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        last = handle.last
    assert out.shape[0] == 2 and last is not None and last.replayed
    assert list(last.n_visual) == [2 * TOKENS_PER_IMAGE] * 2
