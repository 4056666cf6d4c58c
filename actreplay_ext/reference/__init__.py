"""Plain-PyTorch oracles: the four operators (ops.py) and ports of the
published replay and direct-substitution loops (published.py)."""

from .ops import (
                  lens_entropy,
                  lens_logits,
                  replay_scatter,
                  rms_norm,
                  select_tokens,
                  topk_desc_lower_index,
                  topk_kl,
                  topk_logp,
)
from .published import published_direct, published_replay, record_layer_outputs

__all__ = ["lens_entropy", "lens_logits", "published_direct", "published_replay", "record_layer_outputs",
           "replay_scatter", "rms_norm", "select_tokens", "topk_desc_lower_index", "topk_kl", "topk_logp"]
