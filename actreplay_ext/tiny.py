"""An embedded tiny base/RLVR pair and hand-built prompts, for the demo, the
tests and the CPU benchmarks. No download, no processor: random weights from
HF configs, on transformers 4.57.x and 5.x alike.

The RLVR model is the base with perturbed decoder-layer weights. Random tiny
models have near-uniform logit-lens entropies, so the final-norm weight is
scaled up (`sharpen`) to give the selection rules real subsets to pick.
"""

from __future__ import annotations

import copy
import inspect
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["make_model", "make_pair", "make_inputs", "make_processor", "save_pair", "FAMILIES"]

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
    cfg = _config(family, hidden, layers, vocab, heads, kv_heads, intermediate)
    with torch.device(device or "cpu"):
        model = model_class(family)._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return finish(model, sharpen)


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
    # transformers 5.x takes mm_token_type_ids (0 text, 1 image, 2 video); 4.57 rejects it in generate.
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        mm = torch.zeros_like(input_ids, dtype=torch.int32)
        mm[input_ids == IMAGE_TOKEN_ID] = 1
        mm[input_ids == VIDEO_TOKEN_ID] = 2
        out["mm_token_type_ids"] = mm
    return out


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
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    import transformers

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
