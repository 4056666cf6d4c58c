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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..core import capture_prefill, files, lens_params, run_layers
from ..models import check_pair, get_adapter
from ..reference import lens_logits

__all__ = ["LayerStats", "lens_kl", "Analysis", "plot", "plot_titles", "representative_layers"]

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
    histogram and the plots. The model names label the plot titles and fill the
    `base` and `rlvr` columns of every CSV row."""

    def __init__(self, base_name: str = "base", rlvr_name: str = "RLVR"):
        self.base_name, self.rlvr_name = str(base_name), str(rlvr_name)
        self._entropy: Dict[int, List[torch.Tensor]] = {}
        self._kl: Dict[int, List[torch.Tensor]] = {}
        self.prompts = 0

    @property
    def names(self) -> Tuple[str, str]:
        """(base name, RLVR name); assignable as a pair."""
        return self.base_name, self.rlvr_name

    @names.setter
    def names(self, pair: Sequence[str]) -> None:
        self.base_name, self.rlvr_name = (str(n) for n in pair)

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

    def kl_grid(self, buckets: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
        """The heatmap's data: mean KL [layers, buckets] (NaN where a bucket is
        empty, i.e. a layer has fewer tokens than buckets) and the token count
        of each cell [layers, buckets]; row i is the i-th of layers()."""
        index = {s.layer: i for i, s in enumerate(self.layers())}
        mean = torch.full((len(index), buckets), float("nan"), dtype=torch.float64)
        tokens = torch.zeros(len(index), buckets, dtype=torch.long)
        for r in self.deciles(buckets):
            mean[index[r["layer"]], r["bucket"] - 1] = r["mean_kl"]
            tokens[index[r["layer"]], r["bucket"] - 1] = r["tokens"]
        return mean, tokens

    def entropy_grid(self, bins: int = 30) -> Tuple[torch.Tensor, torch.Tensor]:
        """Bin edges [bins + 1] (equal bins over the range of all layers) and the
        counts of base entropies per layer and bin [layers, bins]."""
        stats = self.layers()
        allent = torch.cat([s.entropy for s in stats])
        lo, hi = float(allent.min()), float(allent.max())
        hi = hi if hi > lo else lo + 1.0  # one distinct value: still a valid range
        counts = torch.stack([torch.histc(s.entropy.float(), bins=bins, min=lo, max=hi) for s in stats])
        return torch.linspace(lo, hi, bins + 1), counts.long()

    def histogram(self, bins: int = 30) -> List[Dict]:
        """Per layer: counts of base entropies in `bins` equal bins over the range of all layers."""
        edges, counts = self.entropy_grid(bins)
        return [{"layer": s.layer, "bin_lo": float(edges[i]), "bin_hi": float(edges[i + 1]),
                 "count": int(counts[j, i])} for j, s in enumerate(self.layers()) for i in range(bins)]

    def write_csv(self, out_dir: str) -> List[str]:
        """kl_by_entropy_decile.csv and entropy_histogram.csv; every row names
        the two models (columns base, rlvr) so tables of several runs concatenate."""
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        names = {"base": self.base_name, "rlvr": self.rlvr_name}
        for name, rows in (("kl_by_entropy_decile.csv", self.deciles()), ("entropy_histogram.csv", self.histogram())):
            path = os.path.join(out_dir, name)
            with files.open_output(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=[*names, *rows[0]])
                w.writeheader()
                w.writerows({**names, **r} for r in rows)
            paths.append(path)
        return paths


#: At most this many layers get their own curve in kl_by_entropy_decile.png (plus the mean).
MAX_CURVES = 6
#: Heatmap cells carry their token count up to this many layers (beyond, the CSV has them).
ANNOTATE_LAYERS = 8


def representative_layers(layers: Sequence[int], k: int = MAX_CURVES) -> List[int]:
    """At most k of `layers`: the first, the last and evenly spaced ones between."""
    if len(layers) <= k:
        return list(layers)
    picks = torch.linspace(0, len(layers) - 1, k).round().long().tolist()
    return [layers[i] for i in sorted(set(picks))]


def _token_note(tokens: torch.Tensor) -> str:
    """How many tokens a decile holds (equal-count buckets: one number or a narrow range)."""
    lo, hi = int(tokens.min()), int(tokens.max())
    return f"{lo} tokens per decile" if lo == hi else f"{lo}-{hi} tokens per decile"


def plot_titles(analysis: Analysis, title: str = "") -> Dict[str, str]:
    """The title of each PNG, keyed by file name: the first line names the
    models, the second is `title` (or the prompt count) and the token counts."""
    kl = f"KL({analysis.base_name} ‖ {analysis.rlvr_name})"
    _, tokens = analysis.kl_grid()
    layers = tokens.shape[0]
    sub = title or f"visual tokens of {analysis.prompts} prompt(s)"
    counts = "token counts per cell" if layers <= ANNOTATE_LAYERS else \
        "token counts per cell in kl_by_entropy_decile.csv"
    shown = "all layers" if layers <= MAX_CURVES else \
        f"{len(representative_layers(list(range(layers))))} of {layers} layers and their mean"
    return {
        "kl_heatmap.png": f"Mean {kl} of the logit lens, layer × base-entropy decile\n"
                          f"{sub}; {counts}",
        "kl_by_entropy_decile.png": f"Mean {kl} of the logit lens by base-entropy decile\n"
                                    f"{sub}; {shown}; {_token_note(tokens)}",
        "entropy_histogram.png": f"Base ({analysis.base_name}) logit-lens entropy of the visual tokens per layer\n"
                                 f"{sub}",
    }


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the plots need matplotlib: pip install 'actreplay_ext[analyze]'") from e
    return plt


def _layer_ticks(ax, layers: Sequence[int]) -> None:
    """Every layer labelled up to 32 rows, else every k-th (labels must not overlap)."""
    step = max(1, -(-len(layers) // 32))
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)], fontsize="small")


def _save(plt, fig, path: str) -> str:
    try:
        with files.open_output(path, "wb") as f:
            fig.savefig(f, format="png", dpi=120, bbox_inches="tight")  # tight: a long title or the legend is never cut
    finally:
        plt.close(fig)
    return path


def _plot_heatmap(plt, analysis: Analysis, path: str, title: str) -> str:
    """Layer × decile image of mean KL; counts written in the cells of a small grid."""
    mean, tokens = analysis.kl_grid()
    layers = [s.layer for s in analysis.layers()]
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: an empty bucket (under 10 tokens)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 1.8 + 0.22 * len(layers))))
    im = ax.imshow(mean.numpy(), cmap=cmap, aspect="auto", origin="lower", interpolation="nearest",
                   extent=(0.5, mean.shape[1] + 0.5, -0.5, len(layers) - 0.5))
    fig.colorbar(im, ax=ax, label="mean KL (nats)", pad=0.02)
    if len(layers) <= ANNOTATE_LAYERS:
        vmid = (im.norm.vmin + im.norm.vmax) / 2
        for i in range(len(layers)):
            for j in range(mean.shape[1]):
                dark = bool(torch.isnan(mean[i, j])) or float(mean[i, j]) < vmid  # viridis is dark at the low end
                ax.text(j + 1, i, f"n={int(tokens[i, j])}", ha="center", va="center", fontsize="x-small",
                        color="white" if dark else "black")
    ax.set_xticks(range(1, mean.shape[1] + 1))
    _layer_ticks(ax, layers)
    ax.set_xlabel("base logit-lens entropy decile within the layer (1 = most certain)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize="medium")
    return _save(plt, fig, path)


def _plot_curves(plt, analysis: Analysis, path: str, title: str) -> str:
    """Mean KL by decile for a few representative layers and, bold, the mean over all layers."""
    mean, _ = analysis.kl_grid()
    layers = [s.layer for s in analysis.layers()]
    shown = representative_layers(layers)
    x = list(range(1, mean.shape[1] + 1))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, l in enumerate(shown):
        ax.plot(x, mean[layers.index(l)].tolist(), marker="o", ms=3, lw=1.2, alpha=0.85,
                color=cmap(0.9 * k / max(len(shown) - 1, 1)), label=f"layer {l}")  # 0.9: no pale yellow
    if len(layers) > 1:
        ax.plot(x, mean.nanmean(0).tolist(), color="black", lw=2.8, marker="s", ms=4,
                label=f"mean of {len(layers)} layers")
    ax.set_xticks(x)
    ax.set_xlabel("base logit-lens entropy decile within the layer (1 = most certain)")
    ax.set_ylabel("mean KL of the logit lens (nats)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a curve
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _quartiles(x: torch.Tensor) -> torch.Tensor:
    """First quartile, median and third quartile (linear interpolation, as
    torch.quantile, which refuses inputs over 2**24 elements: a large run has more)."""
    v = x.double().sort().values
    pos = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64) * (v.numel() - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=v.numel() - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _plot_entropy(plt, analysis: Analysis, path: str, title: str) -> str:
    """Layer × entropy-bin image of token counts, with each layer's median and quartiles on top."""
    edges, counts = analysis.entropy_grid()
    stats = analysis.layers()
    layers = [s.layer for s in stats]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 1.8 + 0.22 * len(layers))))
    y = torch.arange(len(layers) + 1) - 0.5
    im = ax.pcolormesh(edges.numpy(), y.numpy(), counts.numpy(), cmap="Greys", shading="flat")
    fig.colorbar(im, ax=ax, label="visual tokens per bin", pad=0.02)
    q = torch.stack([_quartiles(s.entropy) for s in stats])
    # quartiles as a bar across each layer's row: a filled band would hide the counts beneath
    ax.errorbar(q[:, 1].tolist(), list(range(len(layers))), xerr=[(q[:, 1] - q[:, 0]).tolist(),
                (q[:, 2] - q[:, 1]).tolist()], fmt="o", ms=3.5, color="tab:orange", ecolor="tab:orange",
                elinewidth=1.5, capsize=2, label="median and interquartile range")
    ax.set_ylim(-0.5, len(layers) - 0.5)
    _layer_ticks(ax, layers)
    ax.set_xlabel("base logit-lens entropy (nats)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below: over no cell
    return _save(plt, fig, path)


def plot(analysis: Analysis, out_dir: str, title: str = "") -> List[str]:
    """Three PNGs, legible at any depth (28 layers for a 7B model): the layer ×
    decile heatmap of mean KL(base || RLVR) (kl_heatmap.png); mean KL against
    the decile for a few representative layers and the mean of all
    (kl_by_entropy_decile.png); and the base entropies per layer, a layer × bin
    heatmap with median and quartiles (entropy_histogram.png). Returns the paths."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    titles = plot_titles(analysis, title)
    return [draw(plt, analysis, os.path.join(out_dir, name), titles[name])
            for name, draw in (("kl_heatmap.png", _plot_heatmap), ("kl_by_entropy_decile.png", _plot_curves),
                               ("entropy_histogram.png", _plot_entropy))]
