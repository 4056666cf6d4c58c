"""The paper's logit-lens analysis: how far RLVR post-training moved the
logit-lens distribution of each visual token, as a function of how certain the
base model was there.

For every prompt, layer l and visual token i, with p = base lens and q = RLVR
lens of the layer-l *outputs* (the residual stream leaving layer l, i.e. the
input of layer l + 1; final norm and unembedding of each model):

    H_i = entropy of p,       KL_i = KL(p || q) = sum_v p_v (log p_v - log q_v)

over the full vocabulary. The tokens of a layer are bucketed into deciles of
H (over all prompts); each bucket reports its mean and median KL. The paper's
observation is that the KL is largest in the low-entropy buckets.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, Iterable, List, Optional

import torch

from .core import capture_prefill, lens_params, run_layers
from .models import check_pair, get_adapter
from .reference import lens_logits

__all__ = ["LayerStats", "lens_kl", "Analysis", "plot"]

#: Rows of the [rows, V] lens at a time (bounds the float32 logits to rows * V * 4 bytes).
CHUNK_ROWS = 256


def _lens_logp(h: torch.Tensor, unembed: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    """Full-vocabulary log-probabilities of the logit lens, in float32 (SPEC §2)."""
    return torch.log_softmax(lens_logits(h.to(unembed.device), unembed, norm_w, eps), -1)


def _visual_outputs(adapter, inputs: Dict, layers: int) -> List[torch.Tensor]:
    """Each layer's output at the visual tokens of the (batch-1) prompt, [n_vis, D]."""
    pre = capture_prefill(adapter, inputs)
    if pre.input_ids.shape[0] != 1:
        raise ValueError(f"inputs must hold one prompt (batch size 1), got {pre.input_ids.shape[0]}")
    P = pre.prefix_len
    if P == 0:
        return []
    vis = pre.visual[0, :P].nonzero().squeeze(1)
    outs: List[torch.Tensor] = []
    with torch.no_grad():
        run_layers(adapter, pre.hidden0[:, :P], pre.layers.prefix(P), 0, layers,
                   lambda l, h_in, h_out: outs.append(h_out[0].index_select(0, vis.to(h_out.device))))
    return outs


def lens_kl(base, rlvr, inputs: Dict, layers: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
    """Per layer 0..layers-1 (default: all): {"entropy": H [n_vis], "kl": KL [n_vis]}
    at the visual tokens of one prompt, float32 on the CPU. Empty for a
    prompt without visual tokens."""
    b_ad, r_ad = get_adapter(base, "base"), get_adapter(rlvr, "rlvr")
    check_pair(r_ad, b_ad)
    L = b_ad.num_layers if layers is None else int(layers)
    if not 1 <= L <= b_ad.num_layers:
        raise ValueError(f"layers must be in 1..{b_ad.num_layers}, got {layers}")
    base_out = _visual_outputs(b_ad, inputs, L)
    rlvr_out = _visual_outputs(r_ad, inputs, L)
    if not base_out:
        return []
    lens_b, lens_r = lens_params(b_ad), lens_params(r_ad)
    stats = []
    with torch.no_grad():
        for hb, hr in zip(base_out, rlvr_out):
            ent, kl = [], []
            for s in range(0, hb.shape[0], CHUNK_ROWS):
                logp = _lens_logp(hb[s:s + CHUNK_ROWS], *lens_b)
                logq = _lens_logp(hr[s:s + CHUNK_ROWS], *lens_r).to(logp.device)
                p = logp.exp()
                ent.append(-(p * logp).sum(-1).cpu())
                kl.append((p * (logp - logq)).sum(-1).clamp_min(0).cpu())
            stats.append({"entropy": torch.cat(ent), "kl": torch.cat(kl)})
    return stats


@dataclasses.dataclass
class LayerStats:
    layer: int
    entropy: torch.Tensor  # [n] base lens entropy of every visual token of every prompt
    kl: torch.Tensor  # [n] KL(base || RLVR) at the same tokens


class Analysis:
    """Accumulates lens_kl over prompts; writes the decile table, the entropy
    histogram and the plots."""

    def __init__(self):
        self._entropy: Dict[int, List[torch.Tensor]] = {}
        self._kl: Dict[int, List[torch.Tensor]] = {}
        self.prompts = 0

    def add(self, per_layer: Iterable[Dict[str, torch.Tensor]]) -> None:
        self.prompts += 1
        for l, s in enumerate(per_layer):
            self._entropy.setdefault(l, []).append(s["entropy"])
            self._kl.setdefault(l, []).append(s["kl"])

    def layers(self) -> List[LayerStats]:
        return [LayerStats(l, torch.cat(self._entropy[l]), torch.cat(self._kl[l])) for l in sorted(self._entropy)]

    def deciles(self, buckets: int = 10) -> List[Dict]:
        """Per layer and entropy bucket (equal-count quantile buckets of that
        layer's base entropies): range, token count, mean and median KL."""
        rows = []
        for s in self.layers():
            order = torch.argsort(s.entropy, stable=True)
            for b, idx in enumerate(torch.tensor_split(order, buckets)):
                if idx.numel() == 0:
                    continue
                e, k = s.entropy[idx], s.kl[idx]
                rows.append({"layer": s.layer, "bucket": b + 1, "entropy_lo": float(e.min()),
                             "entropy_hi": float(e.max()), "tokens": int(idx.numel()),
                             "mean_kl": float(k.mean()), "median_kl": float(k.median())})
        return rows

    def histogram(self, bins: int = 30) -> List[Dict]:
        """Per layer: counts of base entropies in `bins` equal bins over the range of all layers."""
        stats = self.layers()
        allent = torch.cat([s.entropy for s in stats])
        lo, hi = float(allent.min()), float(allent.max())
        hi = hi if hi > lo else lo + 1.0
        edges = torch.linspace(lo, hi, bins + 1)
        rows = []
        for s in stats:
            counts = torch.histc(s.entropy, bins=bins, min=lo, max=hi)
            rows += [{"layer": s.layer, "bin_lo": float(edges[i]), "bin_hi": float(edges[i + 1]),
                      "count": int(counts[i])} for i in range(bins)]
        return rows

    def write_csv(self, out_dir: str) -> List[str]:
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name, rows in (("kl_by_entropy_decile.csv", self.deciles()), ("entropy_histogram.csv", self.histogram())):
            path = os.path.join(out_dir, name)
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            paths.append(path)
        return paths


def plot(analysis: Analysis, out_dir: str, title: str = "") -> List[str]:
    """Two PNGs: mean KL(base || RLVR) against the base-entropy decile, one
    curve per layer; and the histogram of base entropies, one curve per layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plots need matplotlib: pip install 'actreplay_ext[analyze]'") from e

    os.makedirs(out_dir, exist_ok=True)
    deciles, hist = analysis.deciles(), analysis.histogram()
    layers = sorted({r["layer"] for r in deciles})
    cmap = plt.get_cmap("viridis")
    colour = {l: cmap(i / max(len(layers) - 1, 1)) for i, l in enumerate(layers)}
    legend = dict(fontsize="small", ncol=2 if len(layers) > 8 else 1, title="layer", loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))  # outside the axes: never over a curve
    paths = []

    def save(fig, ax, name, xlabel, ylabel, title):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(**legend)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for l in layers:
        rows = [r for r in deciles if r["layer"] == l]
        ax.plot([r["bucket"] for r in rows], [r["mean_kl"] for r in rows], marker="o", ms=3, color=colour[l],
                label=str(l))
    ax.set_xticks(range(1, 11))
    save(fig, ax, "kl_by_entropy_decile.png", "base logit-lens entropy decile (1 = most certain)",
         "mean KL(base ‖ RLVR) of the logit lens (nats)",
         title or f"KL by base entropy, visual tokens of {analysis.prompts} prompt(s)")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for l in layers:
        rows = [r for r in hist if r["layer"] == l]
        ax.plot([(r["bin_lo"] + r["bin_hi"]) / 2 for r in rows], [r["count"] for r in rows],
                drawstyle="steps-mid", color=colour[l], label=str(l))
    save(fig, ax, "entropy_histogram.png", "base logit-lens entropy (nats)", "visual tokens",
         f"Base entropy of the visual tokens, {analysis.prompts} prompt(s)")
    return paths
