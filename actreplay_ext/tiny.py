"""Embedded tiny base/RLVR pairs and hand-built prompts, for the demo, the
tests and the CPU benchmarks. No download, no processor: random weights from
HF configs, on transformers 4.57.x and 5.x alike.

The RLVR model is the base with perturbed decoder-layer weights. Random tiny
models have near-uniform logit-lens entropies, so the final-norm weight is
scaled up (`sharpen`) to give the selection rules real subsets to pick.

Qwen2-VL / Qwen2.5-VL (`make_model`, `make_pair`, `make_inputs`,
`make_processor`, `save_pair`) are the demo's pair. Every family the package
supports has a tiny model here too, registered in `FAMILIES_TINY` (a
`TinyFamily` each: how to build it, its prompts, where its parts are, the
noise, sharpening and replay configurations its tests use); `pair(name)`
builds one family's pair. A new family is one entry there: the family tests
parametrize over the registry.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["make_model", "model_config", "make_pair", "make_inputs", "make_processor", "save_pair", "FAMILIES",
           "TinyFamily", "FAMILIES_TINY", "pair", "available_families"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 990, 991, 992, 993
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
IM_START_ID, UNK_ID = 994, 995
TEXT_IDS = (3, 900)


def _config(family: str, hidden: int, layers: int, vocab: int, heads: int, kv_heads: Optional[int] = None,
            intermediate: Optional[int] = None):
    import transformers

    head_dim = hidden // heads
    half = head_dim // 2
    sections = [half - 2 * (half // 3), half // 3, half // 3]  # M-RoPE sections sum to head_dim / 2
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or max(1, heads // 2), max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": sections},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_heads=2)
    if family == "qwen2_vl":
        cls = transformers.Qwen2VLConfig
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, mlp_ratio=2, **common)
    elif family == "qwen2_5_vl":
        cls = transformers.Qwen2_5_VLConfig
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=56,
                      fullatt_block_indexes=[1], tokens_per_second=2, **common)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID,
               vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID, bos_token_id=BOS_ID,
               eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def model_class(family: str):
    import transformers

    return {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[family]


def make_model(family: str = "qwen2_5_vl", seed: int = 0, hidden: int = 64, layers: int = 4, vocab: int = 1000,
               heads: int = 4, kv_heads: Optional[int] = None, intermediate: Optional[int] = None,
               attn_implementation: str = "eager", dtype=torch.float32, sharpen: float = 35.0, device=None):
    """A random model; `device` builds the weights there directly (7B-shaped models on a GPU)."""
    torch.manual_seed(seed)
    cfg = model_config(family, hidden, layers, vocab, heads, kv_heads, intermediate)
    with torch.device(device or "cpu"):
        model = model_class(family)._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return finish(model, sharpen)


def model_config(family: str = "qwen2_5_vl", hidden: int = 64, layers: int = 4, vocab: int = 1000, heads: int = 4,
                 kv_heads: Optional[int] = None, intermediate: Optional[int] = None):
    """The HF config of `make_model` (the demo's pair, with its defaults): what a
    tool checks a replay configuration against before it builds any weights."""
    return _config(family, hidden, layers, vocab, heads, kv_heads, intermediate)


def build(model_cls, config, sharpen: float, attn_implementation: str = "eager", dtype=torch.float32):
    """A random model of `model_cls` from `config`, finished as below (any tiny HF VLM)."""
    return finish(model_cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype), sharpen)


def finish(model, sharpen: float):
    """Eval mode, a sharpened lens (effective final-norm weight x `sharpen`) and
    fixed-length greedy generations, for any tiny HF VLM."""
    from .models import get_adapter

    model.eval()
    get_adapter(model).scale_lens_norm(sharpen)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


def make_pair(family: str = "qwen2_5_vl", seed: int = 0, noise: float = 0.05, **kwargs):
    """(base, rlvr): rlvr is base with Gaussian noise (std = noise * the parameter's
    std) on every text decoder-layer weight."""
    base = make_model(family, seed=seed, **kwargs)
    return base, perturbed_copy(base, noise, seed + 1234)


def perturbed_copy(base, noise: float, seed: int):
    """A copy of `base` with Gaussian noise (std = noise * the parameter's std) on
    every text decoder-layer weight: a stand-in for an RLVR post-trained model."""
    from .models import get_adapter

    rlvr = copy.deepcopy(base)
    dev = next(base.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter(rlvr).decoder_layers().parameters():
            std = float(p.float().std()) if p.numel() > 1 else 0.0
            scale = std if std > 0 else 1.0
            p.add_((torch.randn(p.shape, generator=g, device=dev) * noise * scale).to(p.dtype))
    return rlvr


def make_inputs(model, images: Sequence[Tuple[int, int]] = ((8, 8),), video: Optional[Tuple[int, int, int]] = None,
                text_len: int = 16, batch: int = 1, seed: int = 0, left_pad: Sequence[int] = ()) -> Dict:
    """A prompt built by hand: text, then each image (grid h x w in patches; h*w/4
    visual tokens), then an optional video (grid t x h x w), then text.
    `left_pad[b]` pad tokens are prepended to row b (attention mask 0); the other
    rows get as many more leading text tokens, so all rows have one length."""
    cfg = model.config
    vcfg = cfg.vision_config
    merge = vcfg.spatial_merge_size
    g = torch.Generator().manual_seed(seed)
    lo, hi = TEXT_IDS
    pads = list(left_pad) + [0] * (batch - len(left_pad))
    rows = []
    for b in range(batch):
        lead = text_len // 2 + max(pads, default=0) - pads[b]
        ids = torch.randint(lo, hi, (lead,), generator=g).tolist()
        for h, w in images:
            ids += [VISION_START_ID] + [IMAGE_TOKEN_ID] * (h * w // merge**2) + [VISION_END_ID]
        if video is not None:
            t, h, w = video
            ids += [VISION_START_ID] + [VIDEO_TOKEN_ID] * (t * h * w // merge**2) + [VISION_END_ID]
        ids += torch.randint(lo, hi, (text_len - text_len // 2,), generator=g).tolist()
        rows.append(ids)
    width = max(len(r) + p for r, p in zip(rows, pads))
    input_ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    pdim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    dtype = next(model.parameters()).dtype
    if images:
        grids = [(1, h, w) for h, w in images] * batch
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        out["pixel_values"] = torch.randn(sum(t * h * w for t, h, w in grids), pdim, generator=g).to(dtype)
    if video is not None:
        grids = [tuple(video)] * batch
        out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        out["pixel_values_videos"] = torch.randn(sum(t * h * w for t, h, w in grids), pdim, generator=g).to(dtype)
    return with_mm_token_types(model, out, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID)


def with_mm_token_types(model, inputs: Dict, image_id: int, video_id: int) -> Dict:
    """`inputs` with the mm_token_type_ids (0 text, 1 image, 2 video) that transformers 5.x
    Qwen models take (M-RoPE is computed from them); 4.57 rejects them in generate."""
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        ids = inputs["input_ids"]
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[ids == image_id] = 1
        mm[ids == video_id] = 2
        inputs["mm_token_type_ids"] = mm
    return inputs


# ------------------------------------------------------------- a tiny processor

#: Words of the embedded tokenizer, after the ten digits (ids 3..12).
WORDS = ("+", "-", "*", "/", "=", "?", ".", ",", ":", "(", ")", "{", "}", "\\", "boxed", "what", "is", "the",
         "answer", "how", "many", "are", "there", "in", "this", "image", "video", "of", "and", "which", "option",
         "A", "B", "C", "D", "shapes", "frames", "sum", "count", "user", "assistant")


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over the tiny models' vocabulary: specials at the
    ids the model configs use, digits, a few words, and every other id a digit
    too (written `d~id`, decoded as `d`), so the random models' answers read as
    numbers and a numeric verifier is right about one time in ten."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    special = {"<pad>": PAD_ID, "<s>": BOS_ID, "<|im_end|>": EOS_ID, "<|image_pad|>": IMAGE_TOKEN_ID,
               "<|video_pad|>": VIDEO_TOKEN_ID, "<|vision_start|>": VISION_START_ID,
               "<|vision_end|>": VISION_END_ID, "<|im_start|>": IM_START_ID, "<unk>": UNK_ID}
    vocab = dict(special)
    words = [str(d) for d in range(10)] + list(WORDS)
    used = set(special.values())
    free = (i for i in range(vocab_size) if i not in used)
    for word, i in zip(words, free):
        vocab[word] = i
    for i in free:
        vocab[f"{i % 10}~{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Sequence([decoders.Replace(Regex("~[0-9]+$"), ""), decoders.Replace(Regex("^"), " ")])
    # 4.57's Qwen processors insist on a Qwen2 tokenizer class; 5.x's Qwen2Tokenizer
    # rebuilds a BPE model and drops ours, and 5.x processors take any fast tokenizer.
    v4 = int(transformers.__version__.split(".")[0]) < 5
    cls = transformers.Qwen2TokenizerFast if v4 else transformers.PreTrainedTokenizerFast
    return cls(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
        additional_special_tokens=[k for k in special if k.startswith("<|")], clean_up_tokenization_spaces=False)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def make_processor(model):
    """A Qwen2.5-VL style processor for a tiny model: its image and video
    processors (small pixel budgets: 4 to 16 visual tokens per image), the
    word-level tokenizer above and a plain chat template. Needs torchvision
    (the video processor does)."""
    import transformers

    vcfg = model.config.vision_config
    budget = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=vcfg.patch_size,
                  merge_size=vcfg.spatial_merge_size, temporal_patch_size=vcfg.temporal_patch_size)
    cls = (transformers.Qwen2_5_VLProcessor if model.config.model_type == "qwen2_5_vl"
           else transformers.Qwen2VLProcessor)
    return cls(image_processor=transformers.Qwen2VLImageProcessor(**budget),
               video_processor=transformers.Qwen2VLVideoProcessor(**budget),
               tokenizer=_tokenizer(model.config.text_config.vocab_size), chat_template=CHAT_TEMPLATE)


def save_pair(directory: str, family: str = "qwen2_5_vl", noise: float = 0.2) -> Tuple[str, str]:
    """Write the embedded pair as two checkpoints (weights, config, processor)
    under `directory`/base and `directory`/rlvr, loadable like real ones with
    `AutoModelForImageTextToText` and `AutoProcessor`. Returns the two paths."""
    import os

    base, rlvr = make_pair(family, noise=noise)
    processor = make_processor(rlvr)
    paths = []
    for name, model in (("base", base), ("rlvr", rlvr)):
        path = os.path.join(directory, name)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


# ------------------------------------------------- the other families' tiny models
#
# Each family: its token ids and sizes, a `make_<family>(seed, sharpen)` that
# builds the finished random base model, and a `<family>_inputs(model, ...)`
# that builds a prompt by hand (its defaults: the prompt the parity test uses).
# The numbers are the ones the family's tests have always used.

# ---- LLaVA-1.5 style (CLIP vision tower, Llama text model)

LLAVA_IMAGE_TOKEN_ID = 990
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 56, 14
LLAVA_TOKENS_PER_IMAGE = (LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2  # "default" strategy drops the CLS token
LLAVA_SHARPEN = 45.0  # the ratio rule then selects real subsets (about 10 of the 32 visual tokens per layer)


def make_llava(seed: int = 0, sharpen: float = LLAVA_SHARPEN):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=LLAVA_IMAGE_SIZE,
                           patch_size=LLAVA_PATCH, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        image_token_index=LLAVA_IMAGE_TOKEN_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return build(transformers.LlavaForConditionalGeneration, cfg, sharpen)


def llava_inputs(model=None, n_images: int = 2, text_len: int = 12, seed: int = 0) -> Dict:
    """BOS, text, each image's placeholders followed by two text tokens, text;
    pixel_values [n_images, 3, 56, 56]. (`model` is not needed; it is there so
    that every family's prompt is made the same way.)"""
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for _ in range(n_images):
        ids += [LLAVA_IMAGE_TOKEN_ID] * LLAVA_TOKENS_PER_IMAGE + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(n_images, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=g)}


# ---- LLaVA-OneVision (SigLIP vision tower, anyres tiling, Qwen2 text model)

OV_IMAGE_TOKEN_ID, OV_VIDEO_TOKEN_ID = 990, 991
OV_TILE, OV_PATCH = 32, 8  # 4 x 4 = 16 tokens per tile
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
# (H, W) -> tiles, tokens. (16, 64): pinpoint 32x64 (2 tiles + base), 4 x 8 grid cut to 2 x 8 rows,
# 16 + 2 * (8 + 1) = 34. (64, 40): pinpoint 64x64 (4 tiles + base), 8 x 8 grid cut to 8 x 6, shrunk
# (anyres_max_1) to 4 x 3: 16 + 4 * (3 + 1) = 32.
# (48, 32): pinpoint 64x32 (2 tiles + base), 8 x 4 grid cut to 6 x 4, shrunk to 4 x 3: also 32 tokens, so
# from its features alone it could be either tiling (3 or 5 tiles).
OV_IMAGES = {(16, 64): (3, 34), (64, 40): (5, 32), (48, 32): (3, 32)}
OV_MAX_TILES = 5
OV_SHARPEN = 45.0


def make_llava_onevision(seed: int = 0, sharpen: float = OV_SHARPEN):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=OV_TILE, patch_size=OV_PATCH,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=2048, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_1", image_token_index=OV_IMAGE_TOKEN_ID,
        video_token_index=OV_VIDEO_TOKEN_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return build(transformers.LlavaOnevisionForConditionalGeneration, cfg, sharpen)


def llava_onevision_inputs(model=None, sizes=((16, 64), (64, 40)), text_len: int = 12, seed: int = 0,
                           frames: int = 0) -> Dict:
    """Text, each image's placeholders (count from OV_IMAGES), text, an optional
    video of `frames` frames, text; pixel_values [n_images, OV_MAX_TILES, 3, 32, 32]
    with the unused tiles zero, as the processor pads them."""
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for size in sizes:
        ids += [OV_IMAGE_TOKEN_ID] * OV_IMAGES[tuple(size)][1] + torch.randint(3, 900, (2,), generator=g).tolist()
    if frames:
        ids += [OV_VIDEO_TOKEN_ID] * (frames * 4 + 1) + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if sizes:
        pixels = torch.zeros(len(sizes), OV_MAX_TILES, 3, OV_TILE, OV_TILE)
        for i, size in enumerate(sizes):
            n = OV_IMAGES[tuple(size)][0]
            pixels[i, :n] = torch.randn(n, 3, OV_TILE, OV_TILE, generator=g)
        out["pixel_values"] = pixels
        out["image_sizes"] = torch.tensor([list(s) for s in sizes])
    if frames:
        out["pixel_values_videos"] = torch.randn(1, frames, 3, OV_TILE, OV_TILE, generator=g)
    return out


# ---- Idefics3 and SmolVLM (SigLIP-like vision tower, pixel-shuffle connector, Llama text model)

IDEFICS3_IMAGE_TOKEN_ID, IDEFICS3_FAKE_AROUND_ID, IDEFICS3_GLOBAL_IMG_ID = 990, 991, 992
IDEFICS3_IMAGE_SIZE, IDEFICS3_PATCH, IDEFICS3_SCALE = 112, 14, 2
# 64 patches, pixel-shuffled by 2x2: 16 tokens
IDEFICS3_TOKENS_PER_IMAGE = (IDEFICS3_IMAGE_SIZE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2
IDEFICS3_SHARPEN = 45.0  # the ratio rule then selects real subsets of the visual tokens
# The random connector (a LayerNorm'd 128-wide input through one Linear) gives
# image features ~10x the norm of the text embeddings; the decoder layers then
# move the visual residual stream by ~3%, the base/RLVR KL is ~1e-3 and the
# loss is float32 rounding of the top-k log-softmax. Scaled down, the features
# are on the text embeddings' scale, as the LLaVA projector's are.
IDEFICS3_FEATURE_SCALE = 0.05


def make_idefics3(family: str = "idefics3", seed: int = 0, sharpen: float = IDEFICS3_SHARPEN):
    """`family`: "idefics3" or "smolvlm" (the same layout, another class)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
    }[family]
    cfg = cfg_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IDEFICS3_IMAGE_SIZE, patch_size=IDEFICS3_PATCH),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        scale_factor=IDEFICS3_SCALE, image_token_id=IDEFICS3_IMAGE_TOKEN_ID, pad_token_id=PAD_ID)
    model = model_cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # image features on the scale of the text embeddings, see IDEFICS3_FEATURE_SCALE
        model.model.connector.modality_projection.proj.weight.mul_(IDEFICS3_FEATURE_SCALE)
    return finish(model, sharpen)


def idefics3_image_ids() -> List[int]:
    """One image as the Idefics3 processor writes it: <fake_token_around_image>
    <global-img> <image>*n <fake_token_around_image> (here plain text ids)."""
    return ([IDEFICS3_FAKE_AROUND_ID, IDEFICS3_GLOBAL_IMG_ID] + [IDEFICS3_IMAGE_TOKEN_ID] * IDEFICS3_TOKENS_PER_IMAGE
            + [IDEFICS3_FAKE_AROUND_ID])


def idefics3_inputs(model=None, n_images: int = 2, text_len: int = 12, seed: int = 0) -> Dict:
    """BOS, text, each image (`idefics3_image_ids`) followed by two text tokens,
    text; pixel_values [1, n_images, 3, 112, 112]."""
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(3, 900, (text_len // 2,), generator=g).tolist()
    for _ in range(n_images):
        ids += idefics3_image_ids() + torch.randint(3, 900, (2,), generator=g).tolist()
    ids += torch.randint(3, 900, (text_len - text_len // 2,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(1, n_images, 3, IDEFICS3_IMAGE_SIZE, IDEFICS3_IMAGE_SIZE, generator=g)}


# ---- Gemma 3 (SigLIP vision tower, alternating sliding-window and full-attention layers)

GEMMA3_IMAGE_TOKEN_ID, GEMMA3_BOI_ID, GEMMA3_EOI_ID = 5, 3, 4
GEMMA3_TOKENS_PER_IMAGE = 16  # mm_tokens_per_image: (32 / 4)^2 = 64 patches pooled 2 x 2
GEMMA3_IMAGE_SIZE, GEMMA3_PATCH = 32, 4
GEMMA3_WINDOW = 16  # sliding window; the two-image prompt is 55 tokens, its replay prefix 45
GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GEMMA3_SHARPEN = 30.0  # the ratio rule then selects real subsets (e.g. 2, 6, 16 of the 32 visual tokens)
GEMMA3_PROJECTION_STD = 0.03  # image embeddings of about the text embeddings' size (the default init is zeros)


def make_gemma3(seed: int = 0, sharpen: float = GEMMA3_SHARPEN):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=GEMMA3_WINDOW,
                         layer_types=GEMMA3_LAYER_TYPES, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=GEMMA3_IMAGE_SIZE, patch_size=GEMMA3_PATCH),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE, image_token_index=GEMMA3_IMAGE_TOKEN_ID,
        boi_token_index=GEMMA3_BOI_ID, eoi_token_index=GEMMA3_EOI_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID)
    model = transformers.Gemma3ForConditionalGeneration._from_config(
        cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # zero-initialised: every image would embed to 0
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, GEMMA3_PROJECTION_STD)
    return finish(model, sharpen)


def gemma3_inputs(model=None, n_images: int = 2, seed: int = 0, token_types: bool = True) -> Dict:
    """BOS, text, each image as <boi> <image>*16 <eoi> and three text tokens,
    text; pixel_values [n_images, 3, 32, 32]; token_type_ids (1 at image tokens)
    as the Gemma 3 processor returns them, unless `token_types` is False."""
    g = torch.Generator().manual_seed(seed)
    ids = [BOS_ID] + torch.randint(10, 900, (6,), generator=g).tolist()
    for _ in range(n_images):
        ids += ([GEMMA3_BOI_ID] + [GEMMA3_IMAGE_TOKEN_ID] * GEMMA3_TOKENS_PER_IMAGE + [GEMMA3_EOI_ID]
                + torch.randint(10, 900, (3,), generator=g).tolist())
    ids += torch.randint(10, 900, (6,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(n_images, 3, GEMMA3_IMAGE_SIZE, GEMMA3_IMAGE_SIZE, generator=g)}
    if token_types:  # as the Gemma 3 processor returns them: 1 at image tokens
        inputs["token_type_ids"] = (input_ids == GEMMA3_IMAGE_TOKEN_ID).long()
    return inputs


# ---- Qwen3-VL and Qwen3-VL-MoE (deepstack visual features added after the first decoder layers)

QWEN3_IMAGE_ID, QWEN3_VIDEO_ID, QWEN3_START_ID, QWEN3_END_ID = 990, 991, 992, 993
QWEN3_PATCH, QWEN3_MERGE, QWEN3_TEMPORAL = 16, 2, 2
QWEN3_PIXEL_DIM = 3 * QWEN3_TEMPORAL * QWEN3_PATCH * QWEN3_PATCH
QWEN3_DEEPSTACK_FROM = [0, 2]  # vision blocks whose features are added after text layers 0 and 1
QWEN3_SHARPEN = 30.0  # the ratio rule then selects real subsets (6-10 of the 28 visual tokens per layer)
QWEN3_IMAGES = ((8, 8), (6, 8))  # patch grids: 16 + 12 visual tokens


def qwen3_vl_config(config_cls, **text):
    """A tiny Qwen3-VL(-MoE) config; `text` adds text-model fields (the MoE's experts)."""
    return config_cls(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=10000.0,
                         rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **text),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=QWEN3_PATCH, spatial_merge_size=QWEN3_MERGE, temporal_patch_size=QWEN3_TEMPORAL,
                           out_hidden_size=64, num_position_embeddings=16,
                           deepstack_visual_indexes=QWEN3_DEEPSTACK_FROM),
        image_token_id=QWEN3_IMAGE_ID, video_token_id=QWEN3_VIDEO_ID, vision_start_token_id=QWEN3_START_ID,
        vision_end_token_id=QWEN3_END_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def make_qwen3_vl(seed: int = 0, sharpen: float = QWEN3_SHARPEN):
    import transformers

    torch.manual_seed(seed)
    return build(transformers.Qwen3VLForConditionalGeneration, qwen3_vl_config(transformers.Qwen3VLConfig), sharpen)


def make_qwen3_vl_moe(seed: int = 0, sharpen: float = QWEN3_SHARPEN):
    """Qwen3-VL with mixture-of-experts decoder layers (4 experts, 2 per token, every layer)."""
    import transformers

    torch.manual_seed(seed)
    cfg = qwen3_vl_config(transformers.Qwen3VLMoeConfig, moe_intermediate_size=32, num_experts=4,
                          num_experts_per_tok=2, decoder_sparse_step=1)
    return build(transformers.Qwen3VLMoeForConditionalGeneration, cfg, sharpen)


def qwen3_vl_tokens(images=QWEN3_IMAGES) -> int:
    """The number of visual tokens of images with these patch grids."""
    return sum(h * w // QWEN3_MERGE**2 for h, w in images)


def qwen3_vl_inputs(model, images=QWEN3_IMAGES, video=None, text_len: int = 8, seed: int = 0) -> Dict:
    """text, then each image as <vision_start> <image>*(h*w/4) <vision_end> with
    its own text after it, then an optional video (grid t x h x w) as Qwen3-VL
    lays it out, each frame after a timestamp token in its own
    <vision_start> ... <vision_end>, then text; pixel rows in item order."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 900, (n,), generator=g).tolist()  # noqa: E731
    ids = [BOS_ID] + text(text_len // 2)
    for h, w in images:
        ids += [QWEN3_START_ID] + [QWEN3_IMAGE_ID] * (h * w // QWEN3_MERGE**2) + [QWEN3_END_ID] + text(2)
    if video is not None:
        t, h, w = video
        for _ in range(t):
            ids += text(1) + [QWEN3_START_ID] + [QWEN3_VIDEO_ID] * (h * w // QWEN3_MERGE**2) + [QWEN3_END_ID]
    ids += text(text_len - text_len // 2)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if images:
        out["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in images])
        out["pixel_values"] = torch.randn(sum(h * w for h, w in images), QWEN3_PIXEL_DIM, generator=g)
    if video is not None:
        out["video_grid_thw"] = torch.tensor([list(video)])
        out["pixel_values_videos"] = torch.randn(video[0] * video[1] * video[2], QWEN3_PIXEL_DIM, generator=g)
    return with_mm_token_types(model, out, QWEN3_IMAGE_ID, QWEN3_VIDEO_ID)  # 5.x raises without them


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class TinyFamily:
    """One family's tiny model, as the tests (and anyone else) use it.

    How it is built and prompted:

    - `name`, `class_name`: the registry key and the transformers class
      (e.g. "Qwen2VLForConditionalGeneration").
    - `make_model(seed=, sharpen=)` builds the finished random base model (eval
      mode, sharpened lens, fixed-length greedy generations) with `sharpen` as
      the lens scale; the RLVR model is the base with `noise` (relative)
      Gaussian noise on its decoder layers (`pair`).
    - `make_inputs(model, **kw)` builds a prompt by hand; `prompt_kwargs` are
      the arguments that make it the parity prompt (`prompt(model)`), which has
      `n_visual` visual tokens.
    - `prompts`: named prompts, each the `make_inputs` arguments that differ
      from the parity prompt's (`prompt(model, "one_image")`): "one_image"
      (a single image), "text_only" (no visual token), "prefill" (the prompt a
      plain prefill forward is checked on; the parity prompt where absent).

    Where its parts are (what `get_adapter(model)` must find):

    - `visual_token_ids`: the placeholder ids of its visual tokens, in the
      adapter's order (image first).
    - `text_model_path`: the attribute path, from the model, of its text model
      (the module with the decoder `layers` and final `norm`).
    - `vision_tower_path`: the attribute path of its vision tower.

    The replay configurations its tests run:

    - `lr`, `layers`, `steps`: the parity test's (and, but for the steps,
      the other replay tests').
    - `patch_prompts`, `patch_steps`, `patch_tokens`: patch()ed generate ==
      optimize() + apply(): the prompts (each the `make_inputs` arguments
      that differ from the parity prompt's), the replay steps, the new tokens.
    - `passk_steps`, `passk_tokens`, `passk_config`: Pass@K on the "one_image"
      prompt: the replay steps, the new tokens, `ReplayConfig` overrides."""

    name: str
    class_name: str
    make_model: Callable[..., Any]
    make_inputs: Callable[..., Dict]
    n_visual: int
    noise: float
    sharpen: float
    visual_token_ids: Tuple[int, ...]
    text_model_path: str = "model.language_model"
    vision_tower_path: str = "model.vision_tower"
    lr: float = 1e-3
    layers: int = 3
    steps: int = 15
    prompt_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    prompts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    patch_prompts: Tuple[Mapping[str, Any], ...] = field(default=({},), hash=False)
    patch_steps: int = 15
    patch_tokens: int = 4
    passk_steps: int = 5
    passk_tokens: int = 2
    passk_config: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def available(self) -> bool:
        """Whether the installed transformers has this family's class."""
        import transformers

        return hasattr(transformers, self.class_name)

    def model_class(self):
        import transformers

        return getattr(transformers, self.class_name)

    def model(self, seed: int = 0):
        """The finished random base model."""
        return self.make_model(seed=seed, sharpen=self.sharpen)

    def pair(self, seed: int = 0):
        """(base, rlvr), as `make_pair` builds the Qwen pair: rlvr is `perturbed_copy(base, noise, seed + 1234)`."""
        base = self.model(seed)
        return base, perturbed_copy(base, self.noise, seed + 1234)

    def prompt(self, model, purpose: Optional[str] = None, **kwargs) -> Dict:
        """The family's prompt: by default the parity test's, or the named one
        `purpose` (see `prompts`; "prefill" is the parity prompt unless named);
        `kwargs` override both."""
        if purpose is not None and purpose not in self.prompts and purpose != "prefill":
            raise ValueError(f"tiny family {self.name!r} has no {purpose!r} prompt; "
                             f"named: {', '.join(self.prompts) or 'none'}")
        named = self.prompts.get(purpose, {}) if purpose is not None else {}
        return self.make_inputs(model, **{**self.prompt_kwargs, **named, **kwargs})


_QWEN2_PROMPT = {"images": [(8, 8), (4, 6)], "video": (2, 4, 4)}  # 16 + 6 + 8 visual tokens
_QWEN2 = dict(
    make_inputs=make_inputs, n_visual=30, noise=0.05, sharpen=35.0,
    visual_token_ids=(IMAGE_TOKEN_ID, VIDEO_TOKEN_ID), vision_tower_path="model.visual", prompt_kwargs=_QWEN2_PROMPT,
    prompts={"one_image": dict(images=[(8, 8)], video=None), "text_only": dict(images=[], video=None),
             "prefill": dict(images=[(8, 8)], video=None)},
    patch_prompts=(dict(images=[(8, 8)], video=(2, 4, 4)),), patch_steps=4, patch_tokens=2)
_ONE_OR_NO_IMAGE = {"one_image": dict(n_images=1), "text_only": dict(n_images=0)}
_IDEFICS3 = dict(make_inputs=idefics3_inputs, n_visual=2 * IDEFICS3_TOKENS_PER_IMAGE, noise=0.3,
                 sharpen=IDEFICS3_SHARPEN, visual_token_ids=(IDEFICS3_IMAGE_TOKEN_ID,),
                 text_model_path="model.text_model", vision_tower_path="model.vision_model",
                 prompts=_ONE_OR_NO_IMAGE, patch_tokens=3)
_QWEN3 = dict(make_inputs=qwen3_vl_inputs, n_visual=qwen3_vl_tokens(), noise=0.3, sharpen=QWEN3_SHARPEN, steps=12,
              visual_token_ids=(QWEN3_IMAGE_ID, QWEN3_VIDEO_ID), vision_tower_path="model.visual",
              prompts={"one_image": dict(images=[(8, 8)]), "text_only": dict(images=[])})

FAMILIES_TINY: Dict[str, TinyFamily] = {f.name: f for f in (
    TinyFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", functools.partial(make_model, "qwen2_vl"), **_QWEN2),
    TinyFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", functools.partial(make_model, "qwen2_5_vl"),
               **_QWEN2),
    # NOISE 0.3 below: enough drift that the matched-alignment loss is not a float32 cancellation
    TinyFamily("llava", "LlavaForConditionalGeneration", make_llava, llava_inputs,
               n_visual=2 * LLAVA_TOKENS_PER_IMAGE, noise=0.3, sharpen=LLAVA_SHARPEN,
               visual_token_ids=(LLAVA_IMAGE_TOKEN_ID,), prompts=_ONE_OR_NO_IMAGE, patch_tokens=3),
    TinyFamily("llava_onevision", "LlavaOnevisionForConditionalGeneration", make_llava_onevision,
               llava_onevision_inputs, n_visual=OV_IMAGES[(16, 64)][1] + OV_IMAGES[(64, 40)][1], noise=0.3,
               sharpen=OV_SHARPEN, visual_token_ids=(OV_IMAGE_TOKEN_ID, OV_VIDEO_TOKEN_ID),
               prompts={"one_image": dict(sizes=((64, 40),)), "text_only": dict(sizes=())}),
    TinyFamily("idefics3", "Idefics3ForConditionalGeneration", functools.partial(make_idefics3, "idefics3"),
               **_IDEFICS3),
    TinyFamily("smolvlm", "SmolVLMForConditionalGeneration", functools.partial(make_idefics3, "smolvlm"),
               **_IDEFICS3),
    # Pass@K in the matched alignment: the loop runs layer 0 at least.
    TinyFamily("gemma3", "Gemma3ForConditionalGeneration", make_gemma3, gemma3_inputs,
               n_visual=2 * GEMMA3_TOKENS_PER_IMAGE, noise=0.3, sharpen=GEMMA3_SHARPEN,
               visual_token_ids=(GEMMA3_IMAGE_TOKEN_ID,), prompts=_ONE_OR_NO_IMAGE,
               patch_prompts=(dict(n_images=1), dict(n_images=2)), passk_config=dict(alignment="matched")),
    TinyFamily("qwen3_vl", "Qwen3VLForConditionalGeneration", make_qwen3_vl, **_QWEN3, patch_steps=12,
               passk_steps=4, passk_tokens=3),
    TinyFamily("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", make_qwen3_vl_moe, **_QWEN3, patch_steps=6),
)}


def available_families() -> List[str]:
    """The registered families whose transformers class is installed."""
    return [name for name, fam in FAMILIES_TINY.items() if fam.available]


def pair(name: str, seed: int = 0):
    """(base, rlvr) of the registered family `name` (see `FAMILIES_TINY`)."""
    if name not in FAMILIES_TINY:
        raise ValueError(f"unknown tiny family {name!r}; registered: {', '.join(FAMILIES_TINY)}")
    return FAMILIES_TINY[name].pair(seed)
