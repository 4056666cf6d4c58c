"""A prompt is its input_ids AND its pixels: two prompts with the same text and
same-size images have identical input_ids (every visual position holds the
same placeholder). Targets and results record the hashes of the pixels they
were made from (core/images.py), and every path that matches a prompt to them
refuses other pixels with one line: optimize, patch(targets=), apply, the files
(tests/tools/test_workflow.py holds the command line's case). The same pixels
must still match in every family, through generate's own way of passing them
(transformers 5 encodes images before the forward), with beams and repeated
rows, and after a save and load."""

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.core import image_hashes, images_differ

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


def other_pixels(inputs):
    """The same prompt with other pixels (same sizes: the same input_ids)."""
    out = dict(inputs)
    for key in PIXEL_KEYS:
        if isinstance(inputs.get(key), torch.Tensor):
            out[key] = inputs[key] + 0.5 * torch.ones_like(inputs[key]).bernoulli_(0.5, generator=torch.Generator()
                                                                                   .manual_seed(1))
    return out


def family_setup(name):
    fam = tiny.FAMILIES_TINY[name]
    base, rlvr = fam.pair()
    x = fam.prompt(rlvr, "one_image")
    return base, rlvr, x, ar.ReplayConfig(layers=2, steps=2, lr=fam.lr)


@pytest.mark.parametrize("family", tiny.available_families())
def test_other_pixels_are_refused_and_the_same_pixels_match_in_every_family(family):
    base, rlvr, x, cfg = family_setup(family)
    xb = other_pixels(x)
    assert torch.equal(xb["input_ids"], x["input_ids"])
    targets = ar.compute_targets(base, x, cfg)
    assert targets.images is not None and targets.images.numel() > 0
    # optimize: the same pixels match, other pixels are refused
    result = ar.optimize(rlvr, x, targets, cfg)
    assert torch.equal(result.images, targets.images)
    with pytest.raises(ValueError, match="targets were computed for other images"):
        ar.optimize(rlvr, xb, targets, cfg)
    # patch(targets=): generate passes the pixels its own way (encoded before the forward in transformers 5)
    with ar.patch(rlvr, targets=targets, config=cfg) as h:
        rlvr.generate(**x, max_new_tokens=2, do_sample=False)
        assert h.last.losses, h.last.note
        with pytest.raises(ValueError, match="targets were computed for other images"):
            rlvr.generate(**xb, max_new_tokens=2, do_sample=False)
    # apply: the result's own prompt gets its offsets; the other pixels are refused
    with ar.apply(rlvr, result):
        rlvr.generate(**x, max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="images are not those the result was learned on"):
            rlvr.generate(**xb, max_new_tokens=2, do_sample=False)


def test_repeated_rows_and_a_subset_of_a_batch_still_match():
    base, rlvr = tiny.make_pair(noise=0.5)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=2)
    x = tiny.make_inputs(rlvr, images=[(8, 8)])
    result = ar.optimize(rlvr, x, ar.compute_targets(base, x, cfg), cfg)
    with ar.apply(rlvr, result):  # the images once per return sequence: still this prompt's images
        rlvr.generate(**x, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    # a batch of two prompts (other sizes, other ids); a forward of one of its rows is a subset of its images
    two = tiny.make_inputs(rlvr, images=[(8, 8)], batch=2, seed=4)
    assert not torch.equal(two["pixel_values"][:two["pixel_values"].shape[0] // 2],
                           two["pixel_values"][two["pixel_values"].shape[0] // 2:])
    batch_result = ar.optimize(rlvr, two, ar.compute_targets(base, two, cfg), cfg)
    assert batch_result.images.numel() > result.images.numel() // 2


def test_the_hashes_see_pixels_as_the_vision_tower_does():
    g = torch.Generator().manual_seed(0)
    px = torch.randn(128, 1176, generator=g)
    grid = torch.tensor([[1, 8, 8], [1, 8, 8]])
    a = image_hashes({"pixel_values": px, "image_grid_thw": grid}, torch.bfloat16)
    assert a.numel() == 2  # an image each, whole
    # float32 pixels and the bf16 copy the forward makes are the same images to a bf16 tower
    assert torch.equal(a, image_hashes({"pixel_values": px.bfloat16(), "image_grid_thw": grid}, torch.bfloat16))
    # one changed value is another image; so are an image's patches in another order (a mirrored layout)
    changed = px.clone()
    changed[5, 7] += 1.0
    assert image_hashes({"pixel_values": changed, "image_grid_thw": grid}, torch.bfloat16)[0] != a[0]
    mirrored = torch.cat([px[:64].flip(0), px[64:]])
    assert image_hashes({"pixel_values": mirrored, "image_grid_thw": grid}, torch.bfloat16)[0] != a[0]
    # the same rows on another grid are another image
    assert not torch.equal(a, image_hashes({"pixel_values": px, "image_grid_thw": torch.tensor([[1, 4, 16]] * 2)},
                                           torch.bfloat16))
    # swapped images are another prompt; the images repeated (beams, either order of repetition) are not
    swapped = torch.cat([px[64:], px[:64]])
    assert torch.equal(image_hashes({"pixel_values": swapped, "image_grid_thw": grid}, torch.bfloat16), a.flip(0))
    assert images_differ(a, a.flip(0))
    for rep in (torch.cat([px, px]), torch.cat([px[:64], px[:64], px[64:], px[64:]])):
        assert torch.equal(image_hashes({"pixel_values": rep, "image_grid_thw": grid.repeat(2, 1)}, torch.bfloat16),
                           a)
    assert not images_differ(a, a[1:], subset=True) and images_differ(a, a.flip(0), subset=True)
    # a video at another frame rate is another video
    vid = {"pixel_values_videos": px[:64], "video_grid_thw": torch.tensor([[2, 4, 8]])}
    assert not torch.equal(image_hashes({**vid, "second_per_grid_ts": torch.tensor([1.0])}),
                           image_hashes({**vid, "second_per_grid_ts": torch.tensor([4.0])}))
    # [images, C, H, W]: one hash per image; all-zero padding images are left out
    imgs = torch.randn(3, 3, 8, 8, generator=g)
    padded = torch.cat([imgs, torch.zeros(1, 3, 8, 8)])
    assert image_hashes({"pixel_values": imgs}).numel() == 3
    assert torch.equal(image_hashes({"pixel_values": imgs}), image_hashes({"pixel_values": padded}))
    assert image_hashes({"input_ids": torch.ones(1, 4, dtype=torch.long)}) is None  # text only: nothing to compare
    if torch.cuda.is_available():  # the same on every device
        assert torch.equal(a, image_hashes({"pixel_values": px.cuda(), "image_grid_thw": grid.cuda()},
                                           torch.bfloat16))


def test_rows_with_swapped_images_and_a_video_at_another_rate_are_refused():
    base, rlvr = tiny.make_pair(noise=0.5)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=2)
    x = tiny.make_inputs(rlvr, images=[(8, 8)], batch=2)
    n = x["pixel_values"].shape[0] // 2
    targets = ar.compute_targets(base, x, cfg)
    z = dict(x)
    z["pixel_values"] = torch.cat([x["pixel_values"][n:], x["pixel_values"][:n]])
    with pytest.raises(ValueError, match="targets were computed for other images"):
        ar.optimize(rlvr, z, targets, cfg)
    with ar.patch(rlvr, targets=targets, config=cfg), pytest.raises(ValueError, match="other images"):
        rlvr(**z)
    v = tiny.make_inputs(rlvr, images=[], video=(2, 4, 4))
    assert "second_per_grid_ts" in v or "video_grid_thw" in v
    v = {**v, "second_per_grid_ts": torch.tensor([1.0])}
    video_targets = ar.compute_targets(base, v, cfg)
    ar.optimize(rlvr, v, video_targets, cfg)  # its own rate
    with pytest.raises(ValueError, match="other images"):
        ar.optimize(rlvr, {**v, "second_per_grid_ts": torch.tensor([4.0])}, video_targets, cfg)
    with ar.patch(rlvr, targets=video_targets, config=cfg) as h:  # generate passes the rate its own way
        rlvr.generate(**v, max_new_tokens=2, do_sample=False)
        assert h.last.losses


def test_files_keep_the_images_and_older_files_still_load(tmp_path):
    base, rlvr = tiny.make_pair(noise=0.5)
    cfg = ar.ReplayConfig(layers=3, lr=0.05, steps=2)
    x = tiny.make_inputs(rlvr, images=[(8, 8)])
    xb = other_pixels(x)
    targets = ar.compute_targets(base, x, cfg)
    targets.save(str(tmp_path / "t.safetensors"))
    loaded = ar.ReplayTargets.load(str(tmp_path / "t.safetensors"))
    assert torch.equal(loaded.images, targets.images)
    with pytest.raises(ValueError, match="targets were computed for other images"):
        ar.optimize(rlvr, xb, loaded, cfg)
    result = ar.optimize(rlvr, x, loaded, cfg)
    result.save(str(tmp_path / "r.safetensors"))
    back = ar.ReplayResult.load(str(tmp_path / "r.safetensors"))
    assert torch.equal(back.images, result.images)
    with ar.apply(rlvr, back), pytest.raises(ValueError, match="images are not those"):
        rlvr(**xb)
    # a file from before the images were recorded: loads, and is matched by its input_ids as before
    import dataclasses

    dataclasses.replace(result, images=None).save(str(tmp_path / "old.safetensors"))
    old = ar.ReplayResult.load(str(tmp_path / "old.safetensors"))
    assert old.images is None
    with ar.apply(rlvr, old):
        rlvr(**x)
    # a tampered record is refused by name
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "r.safetensors"))
    tensors["images"] = tensors["images"].repeat(2)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="'images' must be the distinct int64 hashes"):
        ar.ReplayResult.load(str(tmp_path / "bad.safetensors"))
