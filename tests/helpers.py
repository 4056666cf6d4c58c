"""Helpers shared by the tests (a plain module: `import helpers`; tests/conftest.py
puts tests/ on sys.path): tolerances and error measures, the parity check
against the published loop, replay shortcuts, and the devices to run on."""

import os
import shutil

import pytest
import torch

import actreplay_ext

#: the repository root (python/ and benchmarks/ live there)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_DIR = os.path.join(ROOT, "python")

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


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """||out - ref|| / ||ref|| in float64. The denominator is floored at `floor`
    so that quantities that are exactly zero compare absolutely."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / max(float(ref.norm()), floor))


TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def assert_matches_published(result, pub, n_visual: int, hidden: int, steps: int) -> None:
    """The engine's replay equals the published loop's: same selection (a real
    subset at some layer), offsets within 1e-4 relative, every step's loss within
    1e-5 relative, and a loss that falls."""
    assert result.deltas.shape == (n_visual, hidden) and result.deltas.dtype == torch.float32
    assert result.selected == pub["selected"]
    assert 0 < sum(result.selected) < len(result.selected) * n_visual  # the rule picks real subsets
    assert float(result.deltas.abs().max()) > 0
    assert rel_max(result.deltas, pub["deltas"]) <= 1e-4
    assert len(result.losses) == len(pub["losses"]) == steps
    for ours, theirs in zip(result.losses, pub["losses"]):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert result.losses[-1] < result.losses[0]  # the loss falls


class LayerBatchSizes:
    """Records the batch size of every call of one decoder layer (to count how
    many rows the replay loop optimised). Use as a context manager."""

    def __init__(self, layer: torch.nn.Module):
        self.sizes = []
        self._hook = layer.register_forward_hook(lambda mod, args, out: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return False


def replay(base, rlvr, inputs, cfg):
    """The engine's replay of one prompt: base targets, then the RLVR optimisation."""
    return actreplay_ext.optimize(rlvr, inputs, actreplay_ext.compute_targets(base, inputs, cfg), cfg)


def replay_and_published(base, rlvr, inputs, cfg):
    """(the engine's replay, the published loop's) on the same prompt and configuration."""
    return replay(base, rlvr, inputs, cfg), actreplay_ext.reference.published_replay(rlvr, base, inputs, cfg)


def _not_transformers(hook) -> bool:
    return not (getattr(hook, "__module__", None) or "").startswith("transformers.")


def hooks_of(model: torch.nn.Module) -> int:
    """The forward (pre-)hooks on every module of `model`: patch() adds some,
    and after remove() (or an exception) the count must be what it was.
    transformers' own hooks are not counted: 5.x installs output-capturing
    hooks on some vision towers at their first forward, and keeps them."""
    return sum(sum(map(_not_transformers, [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]))
               for m in model.modules())


class FirstLayer0Input:
    """The input of decoder layer 0 at the model's own first call (the prefill
    the model is given; registered before patch(), it sees the input without the
    offsets). The library's passes call the layer too, running the user's hooks
    as the model's forward does; with `internal=True` the first of those is
    recorded instead (for a base model, which only the library runs: its base
    pass's input, the distinct rows up to the last visual token). Use as a
    context manager."""

    def __init__(self, model: torch.nn.Module, internal: bool = False):
        self.hidden = None
        self.internal = internal
        layer0 = actreplay_ext.get_adapter(model).decoder_layers()[0]
        self._hook = layer0.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, mod, args, kwargs):
        from actreplay_ext.core import in_internal_forward

        if self.hidden is None and in_internal_forward() == self.internal:
            self.hidden = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        return False


def base_saw(seen_base: FirstLayer0Input, seen_rlvr: FirstLayer0Input) -> bool:
    """The base pass's layer-0 input is the RLVR prefill's distinct rows up to its
    last visual token (the two models share vision tower and embeddings)."""
    base, rlvr = seen_base.hidden, seen_rlvr.hidden
    if base is None or rlvr is None or base.shape[1] > rlvr.shape[1]:
        return False
    rows = []
    for row in rlvr[:, :base.shape[1]]:
        if not any(torch.equal(row, r) for r in rows):
            rows.append(row)
    return len(rows) == base.shape[0] and all(torch.equal(a, b) for a, b in zip(rows, base))


def repeat_rows(inputs, k: int):
    """A one-image prompt as K identical rows, as generate(num_return_sequences=K)
    expands it: every tensor repeated k times along its first dimension (the
    batch, or the images / pixel rows of the prompt's one image)."""
    return {key: v.repeat(k, *([1] * (v.dim() - 1))) for key, v in inputs.items()}


def greedy_scores(model, inputs, n: int = 3):
    """(sequences, stacked scores) of a greedy generation of n tokens."""
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


def qwen_prompt(model, **kw):
    """The tiny Qwen2 families' prompt of the engine and patch tests: one 8 x 8 image unless told."""
    from actreplay_ext import tiny

    kw.setdefault("images", [(8, 8)])
    return tiny.make_inputs(model, **kw)


def source_copy(tmp_path):
    """The package's sources without a compiled _C in `tmp_path`, as in a fresh clone's root;
    the environment for a subprocess run there."""
    shutil.copytree(os.path.join(ROOT, "actreplay_ext"), tmp_path / "actreplay_ext",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}


def installed_elsewhere(tmp_path):
    """(a PYTHONPATH, a code prefix): the package as it runs now, with its _C, copied to
    `tmp_path/site` and named by that PYTHONPATH, and code that takes an editable install's
    finder out (it would map the name to the built tree before the working directory is
    looked at). Together they make the copy the installed package."""
    shutil.copytree(os.path.dirname(actreplay_ext.__file__), tmp_path / "site" / "actreplay_ext",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return (str(tmp_path / "site"),
            "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; ")
