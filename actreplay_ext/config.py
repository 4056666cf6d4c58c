"""ReplayConfig: the hyperparameters of SPEC §3-4, validated, with the published presets."""

from __future__ import annotations

import dataclasses
import decimal
import math
import numbers
from typing import Callable, ClassVar, Optional, Sequence, Union

__all__ = ["ReplayConfig", "PRESETS", "DIRECT_THRESHOLDS", "OPTIMIZERS", "DEFAULT_LR"]

#: The loop's update rules (actreplay_ext.core.optimizers): "sgd" is the published one.
OPTIMIZERS = ("sgd", "lbfgs")
#: What lr=None means: sgd's published step size; lbfgs's first step length
#: relative to the norm of the visual tokens' hidden states.
DEFAULT_LR = {"sgd": 10.0, "lbfgs": 0.05}

_CHOICES = {
    "optimizer": OPTIMIZERS,
    "alignment": ("published", "matched"),
    "mode": ("tokens", "direct"),
    "select": ("low", "high"),
    "rule": ("ratio", "topk", "absolute"),
}


@dataclasses.dataclass
class ReplayConfig:
    """Activation Replay hyperparameters (defaults: the published math configuration).

    layers: the replay layers, a count n (layers 0 .. n-1; default 16; for
    mode="direct" one per threshold, 7 with the published thresholds) or a
    sorted list of layer indices, the authors' form (e.g. [15] with
    inject_layer=15 is the mid replay). A list 0 .. n-1 is stored as the count
    n; `replay_layers` lists them either way and `depth` is the deepest + 1.  entropy_threshold: the ratio rule's
    threshold.  topv: size of the KL's truncated support.  optimizer: the update
    rule, "sgd" (plain gradient descent, the published one and the default) or
    "lbfgs" (L-BFGS without a per-model step size, returning its best point; see
    actreplay_ext.core.optimizers; its effect on benchmark accuracy is not yet
    measured).  lr: sgd's step size, or lbfgs's first step relative to the
    hidden states' norm; None (kept as None, so a copy with another optimizer
    takes that one's default): DEFAULT_LR of the optimizer (10.0 for sgd, the
    published value); `step_size` is the value the loop uses.
    steps: loss evaluations (sgd updates after each).  tol: stop early once the
    gradient's norm is at most tol times the first one (None: never).
    normalize: divide the summed loss by the number of visual tokens.
    alignment: "published" pairs the RLVR *input* of layer l with the base
    *output* of layer l (what produced the paper's numbers); "matched"
    pairs outputs with outputs.  select/rule/topk_tokens/thresholds: the
    selection variants of SPEC §4 (`thresholds`: one per replay layer, in
    `replay_layers` order).  inject_layer: the layer whose input is offset.
    mode: "tokens" learns offsets; "direct" substitutes base layer inputs into the
    RLVR model where the base lens entropy is below `thresholds[l]` (default: the
    published seven) and below the RLVR model's, over all positions.
    checkpoint: recompute the decoder layers in the backward instead of keeping
    their activations (True, False, or "auto": when the loop's prefix holds at
    least 4096 tokens); same offsets either way.
    compile: run each loop evaluation (the offset layers and the lens KL) through
    torch.compile, dynamic shapes, compiled once per process (opt-in: on CPU the
    first prompt pays the compilation; see benchmarks/RESULTS.md).
    callback: called with (step, loss) after each step's loss is known.
    Numbers may be of any numeric type (numpy scalars and 1-D arrays, Fraction,
    Decimal): they are kept as the Python int or float they stand for.
    """

    layers: Optional[Union[int, Sequence[int]]] = None
    entropy_threshold: float = 0.4
    topv: int = 50
    lr: Optional[float] = None
    steps: int = 25
    normalize: bool = True
    alignment: str = "published"
    mode: str = "tokens"
    select: str = "low"
    rule: str = "ratio"
    inject_layer: int = 0
    topk_tokens: Optional[Union[int, float]] = None
    thresholds: Optional[Sequence[float]] = None
    checkpoint: Union[bool, str] = "auto"
    optimizer: str = "sgd"
    tol: Optional[float] = None
    compile: bool = False
    callback: Optional[Callable[[int, float], None]] = dataclasses.field(default=None, compare=False)

    OPTIMIZERS: ClassVar[tuple] = OPTIMIZERS

    def __post_init__(self):
        self._normalise_numbers()
        for name, choices in _CHOICES.items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise ValueError(
                    f"ReplayConfig: '{name}' must be one of {', '.join(map(repr, choices))}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.mode == "direct" and self.thresholds is None:
            self.thresholds = list(DIRECT_THRESHOLDS)
        if self.layers is None:
            self.layers = len(self.thresholds) if self.mode == "direct" else 16
        listed = isinstance(self.layers, (list, tuple, range))
        if listed:
            self.layers = _layer_list(self.layers)
        else:
            _integer("layers", self.layers, 1)
        _integer("topv", self.topv, 1)
        if self.topv == 1 and self.mode == "tokens":  # refused, not warned: no run with it can do anything
            raise ValueError("ReplayConfig: 'topv' must be >= 2 for mode='tokens', got 1: the KL compares the two "
                             "models' distributions renormalised over the base's top-topv tokens, and over one "
                             "token both are 1, so the loss and the offsets would be 0 whatever the models")
        _integer("steps", self.steps, 1)
        _integer("inject_layer", self.inject_layer, 0)
        if self.lr is not None:  # None stays None, so dataclasses.replace(cfg, optimizer=...) takes the new default
            _real("lr", self.lr, 0.0)
        if self.tol is not None:
            _real("tol", self.tol, 0.0)
        _real("entropy_threshold", self.entropy_threshold, 0.0)
        if not isinstance(self.compile, bool):
            raise ValueError(f"ReplayConfig: 'compile' must be True or False, got {self.compile!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"ReplayConfig: 'normalize' must be True or False, got {self.normalize!r}")
        if not any(self.checkpoint is c for c in (True, False)) and self.checkpoint != "auto":
            raise ValueError(f"ReplayConfig: 'checkpoint' must be True, False or 'auto', got {self.checkpoint!r}")
        if self.callback is not None and not callable(self.callback):
            raise ValueError(f"ReplayConfig: 'callback' must be callable(step, loss) or None, got {self.callback!r}")
        if self.inject_layer >= self.depth:
            raise ValueError(
                f"ReplayConfig: 'inject_layer' must be an int in [0, {self.depth}) (at or before the deepest replay "
                f"layer, {self.depth - 1}), got {self.inject_layer!r}"
            )
        below = [l for l in self.replay_layers if l < self.inject_layer] if listed else []
        if below:  # the loss reads layers inject_layer and deeper: listing one above them is a mistake
            raise ValueError(f"ReplayConfig: 'layers' lists {below} below 'inject_layer' ({self.inject_layer}), where "
                             "no loss can reach the offsets; list layers >= inject_layer")
        if self.mode == "direct" and self.inject_layer:
            raise ValueError(f"ReplayConfig: 'inject_layer' ({self.inject_layer}) applies to mode='tokens'; "
                             "mode='direct' substitutes at the input of every replay layer")
        # a field of another rule would be ignored in silence: the run would be the default rule's
        if self.topk_tokens is not None and self.rule != "topk":
            raise ValueError(f"ReplayConfig: 'topk_tokens' is read by rule='topk' only, and rule={self.rule!r}; "
                             "give rule='topk' too, or drop topk_tokens")
        if self.thresholds is not None and self.rule != "absolute" and self.mode != "direct":
            raise ValueError(f"ReplayConfig: 'thresholds' is read by rule='absolute' and mode='direct' only, and "
                             f"rule={self.rule!r}, mode={self.mode!r}; give rule='absolute' too, or drop thresholds")
        if self.rule == "topk":
            k = self.topk_tokens
            if k is None or isinstance(k, bool) or not (
                (isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1)
            ):
                raise ValueError(
                    "ReplayConfig: rule='topk' needs 'topk_tokens', an int count >= 1 or a float "
                    f"fraction of the visual tokens in (0, 1], got {k!r}"
                )
        if self.rule == "absolute" or self.mode == "direct":
            t = self.thresholds
            if not isinstance(t, (list, tuple)) or len(t) != len(self.replay_layers):
                raise ValueError(
                    f"ReplayConfig: rule='absolute' and mode='direct' need 'thresholds', one float per "
                    f"replay layer ({len(self.replay_layers)}), got {t!r}"
                )
            for i, x in enumerate(t):
                _real(f"thresholds[{i}]", x, None)
            self.thresholds = [float(x) for x in t]

    def _normalise_numbers(self) -> None:
        """Numbers of any numeric type (numpy scalars, Fraction, Decimal) as the
        Python int or float they stand for, and 1-D arrays of layers or thresholds
        as lists, so that what is recorded (as_dict, result and target files) is
        plain JSON and equal to the same config written with Python numbers;
        anything else stays as given, for the checks that follow to name it."""
        for name in _INT_FIELDS:
            setattr(self, name, _as_number(getattr(self, name), integral=True))
        for name in _REAL_FIELDS:
            setattr(self, name, _as_number(getattr(self, name), integral=False))
        layers, thresholds = _as_list(self.layers), _as_list(self.thresholds)
        self.layers = [_as_number(l, integral=True) for l in layers] if isinstance(layers, list) else \
            _as_number(layers, integral=True)
        if isinstance(thresholds, list):
            self.thresholds = [_as_number(t, integral=False) for t in thresholds]
        k = self.topk_tokens  # a count (an integral number) or a fraction (any other real number)
        self.topk_tokens = _as_number(k, integral=isinstance(k, numbers.Integral))

    @property
    def step_size(self) -> float:
        """The lr the loop uses: `lr`, or the optimizer's DEFAULT_LR when lr is None."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else float(self.lr)

    def __eq__(self, other):  # lr=None and lr=<the optimizer's default> are the same configuration
        return type(other) is type(self) and self.as_dict() == other.as_dict()

    __hash__ = None  # mutable, like any non-frozen dataclass

    @property
    def replay_layers(self) -> tuple:
        """The replay layers' indices, ascending."""
        return tuple(range(self.layers)) if isinstance(self.layers, int) else self.layers

    @property
    def depth(self) -> int:
        """The deepest replay layer + 1: how many decoder layers the base pass runs."""
        return self.replay_layers[-1] + 1

    def off_layers(self) -> list:
        """The layers below `depth` that are not replay layers: they select no token."""
        listed = set(self.replay_layers)
        return [l for l in range(self.depth) if l not in listed]

    def thresholds_by_layer(self) -> list:
        """`thresholds` spread over layers 0 .. depth-1 (0.0 at the layers that are
        not replayed, whose selection is cleared anyway)."""
        full = [0.0] * self.depth
        for l, t in zip(self.replay_layers, self.thresholds):
            full[l] = t
        return full

    def as_dict(self) -> dict:
        """The settings as JSON values (the callback is not a setting): what result
        files and reports record, and what `ReplayConfig(**d)` rebuilds."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "callback"}
        fields["lr"] = self.step_size  # recorded resolved: a file says which step size was used
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    def selection_value(self, n_visual: int):
        """(rule, value) for actreplay.select_tokens for a prompt with n_visual tokens."""
        if self.rule == "ratio":
            return "ratio", [float(self.entropy_threshold)]
        if self.rule == "absolute":
            return "absolute", self.thresholds_by_layer()
        k = self.topk_tokens
        count = k if isinstance(k, int) else int(k * n_visual)  # a fraction: floor
        return "topk", [float(min(count, n_visual))]

    @classmethod
    def preset(cls, name: str, **overrides) -> "ReplayConfig":
        if name not in PRESETS:
            raise ValueError(
                f"ReplayConfig.preset: unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}"
            )
        settings = dict(PRESETS[name])
        if overrides.get("optimizer", "sgd") != "sgd" and "lr" not in overrides:
            settings.pop("lr", None)  # the presets' lr is sgd's; another optimizer takes its own default
        return cls(**{**settings, **overrides})


_INT_FIELDS = ("topv", "steps", "inject_layer")
_REAL_FIELDS = ("entropy_threshold", "lr", "tol")


def _as_number(value, integral: bool):
    """An integral number (numpy ints too) as an int, or, where `integral` is
    False, a real number (numpy floats, Fraction, Decimal) as a float; bools and
    everything else unchanged (refused by the checks)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        return value
    if integral:
        return int(value) if isinstance(value, numbers.Integral) else value
    try:
        return float(value)
    except OverflowError:  # a Fraction or Decimal beyond float: not finite, refused as such
        return math.inf if value > 0 else -math.inf
    except ValueError:  # Decimal('sNaN'): not a number, refused as such, naming the field
        return math.nan


def _as_list(value):
    """A list, tuple, range or 1-D array (numpy, torch) as a list; anything else unchanged."""
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if getattr(value, "ndim", None) == 1 and callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


def layer_list(layers) -> tuple:
    """The replay layers that `ReplayConfig(layers=...)` means (a count or a list)."""
    return tuple(range(layers)) if isinstance(layers, int) else tuple(layers)


def _layer_list(layers):
    """A list of replay layers, checked: ints >= 0, ascending, no repeats; 0 .. n-1 becomes n."""
    ok = len(layers) > 0 and all(isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in layers)
    if not ok or any(a >= b for a, b in zip(layers, layers[1:])):
        raise ValueError("ReplayConfig: 'layers' must be a count >= 1 or a non-empty list of layer indices >= 0 in "
                         f"ascending order without repeats, got {list(layers)!r}")
    layers = tuple(layers)
    return len(layers) if layers == tuple(range(len(layers))) else layers


_INT_MAX = 2**31 - 1  # layers, steps, topv ... beyond this fail deep inside torch (OverflowError), not here


def _integer(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _INT_MAX:
        raise ValueError(f"ReplayConfig: '{name}' must be an int in [{lo}, 2**31 - 1], got {value!r}")


def _real(name: str, value, lo: Optional[float]) -> None:
    """A finite real number (not a bool), >= lo when lo is given."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (lo is not None and value < lo):
        what = f"be >= {lo:g} and finite" if lo is not None else "be a finite number"
        raise ValueError(f"ReplayConfig: '{name}' must {what}, got {value!r}")


#: Per-layer absolute thresholds of the published direct substitution (layers 0-6).
DIRECT_THRESHOLDS = (4.812, 4.781, 3.734, 3.297, 3.328, 3.812, 4.312)

#: The published configurations (SPEC §3-4).
PRESETS = {
    "mm-eureka-7b": dict(layers=16, entropy_threshold=0.4, topv=50, lr=10.0, steps=25),
    "vl-rethinker-7b": dict(layers=24, entropy_threshold=0.4, topv=50, lr=10.0, steps=25),
    # Mid replay: offsets at the input of layer 15, loss at layer 15 only.
    "mid-replay": dict(layers=16, inject_layer=15, entropy_threshold=0.4, topv=50, lr=10.0, steps=25),
    # The agent (DeepEyes) and video (Video-R1) code: direct cross-model substitution.
    "deepeyes-7b": dict(mode="direct", layers=7, thresholds=list(DIRECT_THRESHOLDS)),
    "video-r1-7b": dict(mode="direct", layers=7, thresholds=list(DIRECT_THRESHOLDS)),
}
