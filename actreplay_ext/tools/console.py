"""What every command-line tool shares: the parser (errors on one line) and
the types of its options, the logging and verbosity options, the
model-loading options with one set of defaults, file writes ("-" the standard
output; everything else through `core.files`), a generation progress bar, and
`guarded`, which turns bad input into one line (exit 2) and Ctrl-C into
"interrupted" (exit 130)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import traceback
from typing import Callable

import torch

from ..core import files

__all__ = ["UsageError", "CommandParser", "STDOUT", "add_logging_options", "add_load_options", "setup_logging",
           "load_kwargs", "guarded", "write_text", "write_json", "writing", "generation_progress", "version_line",
           "layers_arg", "positive_int", "replay_config"]

log = logging.getLogger("actreplay_ext")

#: What an output option takes to mean the standard output, as Unix tools do.
STDOUT = "-"


class UsageError(ValueError):
    """Bad input that the user fixes: a one-line message, exit status 2."""


def version_line() -> str:
    import transformers

    import actreplay_ext

    cuda = actreplay_ext.build_info().get("cuda")
    return (f"actreplay_ext {actreplay_ext.__version__} (torch {torch.__version__}, transformers "
            f"{transformers.__version__}, CUDA kernels {'built' if cuda else 'not built'})")


def add_logging_options(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--quiet/--verbose/--log-level. `suppress`: for a subcommand's copy, so
    the options work before or after the command without resetting each other."""
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="no progress bars (ours, transformers', huggingface_hub's); only warnings and errors")
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="debug logging, and a traceback with every error")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default,
                   help="the level of actreplay_ext's log (default info; --quiet: warning; --verbose: debug)")


def add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="torch dtype of the weights (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device-map", default=None,
                   help='where the weights go (default: "auto" with a GPU, else the CPU); any accelerate device_map')
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"],
                   help="attention implementation (default sdpa)")


def load_kwargs(args, device=None) -> dict:
    """The arguments of data.load_model, with the defaults every tool shares.
    `device`: one device for the whole model (a data-parallel rank)."""
    gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    device_map = {"": str(device)} if device is not None else (args.device_map or ("auto" if gpu else None))
    return dict(dtype=args.dtype or ("bfloat16" if gpu else "float32"), device_map=device_map, attn=args.attn)


class CommandParser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the
    tools (`actreplay run: error: argument --steps: expected an int >= 1, got
    '0'`), exit status 2; --help shows the usage. Subcommands inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """The type of every count option (--max-new-tokens, --steps, --samples,
    --k, --limit, ...): an int >= 1. Zero or a negative count is refused here,
    so that no command can read it as "the default" or "all but N"."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def layers_arg(text: str):
    """--layers: a count N >= 1 (layers 0..N-1) or a comma-separated list of layer indices."""
    try:
        if "," in text:  # every entry a layer: "3," is neither the count 3 nor a list, refused
            return [int(x) for x in text.split(",")]
        return positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"expected a count like 16 or a list like 0,2,4, got {text!r}") from None


REPLAY_OPTIONS = ("layers", "lr", "steps", "optimizer", "tol")


def replay_config(args, defaults=None, **overrides):
    """The preset named by --preset (or the settings `defaults`, e.g. a demo's) with
    --layers/--lr/--steps/--optimizer/--tol (and `overrides`) on top; a bad
    combination is a UsageError naming the options."""
    from ..config import ReplayConfig

    given = {k: getattr(args, k) for k in REPLAY_OPTIONS if getattr(args, k, None) is not None}
    given.update(overrides)
    if defaults is not None:
        settings = dict(defaults)
        if given.get("optimizer", "sgd") != "sgd" and "lr" not in given:
            settings.pop("lr", None)  # the defaults' lr is sgd's, as a preset's is
        try:
            return ReplayConfig(**{**settings, **given})
        except ValueError as e:
            raise UsageError(f"{as_options(given)}: {e}") from None
    try:
        return preset_with(args.preset, given)
    except ValueError as e:
        raise UsageError(f"--preset {args.preset} {as_options(given)}: {e}".replace("  ", " ")) from None


def preset_with(preset: str, given: dict):
    """ReplayConfig.preset(preset) with the fields `given` on top; a direct
    substitution preset keeps its threshold of each layer `given` names."""
    from ..config import PRESETS, ReplayConfig

    thresholds = PRESETS[preset].get("thresholds") if preset in PRESETS else None
    layers = given.get("layers")
    if thresholds is not None and layers is not None and "thresholds" not in given:
        wanted = range(layers) if isinstance(layers, int) else layers
        if any(not isinstance(l, int) or not 0 <= l < len(thresholds) for l in wanted):
            raise ValueError(f"preset {preset!r} has thresholds for layers 0..{len(thresholds) - 1} only")
        given = {**given, "thresholds": [thresholds[l] for l in wanted]}
    return ReplayConfig.preset(preset, **given)


def loss_change(cfg, losses) -> str:
    """'first -> last over n steps' (sgd, the published loop), or first -> the
    best for an optimizer that returns its best point (lbfgs)."""
    if cfg.optimizer == "sgd":
        return f"{losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} steps"
    return f"{losses[0]:.4g} -> {min(losses):.4g} (the best of {len(losses)} evaluations, returned)"


def as_options(given: dict) -> str:
    """{'tol': -1.0, 'layers': (0, 2)} as the command line said it: '--tol -1.0 --layers 0,2'."""
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return " ".join(f"--{k.replace('_', '-')} {value(v)}" for k, v in given.items())


class _OneHandler(logging.StreamHandler):
    """The CLI's handler on the package logger (a marker class: setting up twice replaces it)."""


def setup_logging(args) -> Callable[[], None]:
    """One handler on the "actreplay_ext" logger (the root logger is left alone,
    so nothing prints twice); --quiet also silences transformers and
    huggingface_hub, their progress bars included. Returns a function that
    puts the package logger back as it was (a command run in-process, as
    tests and notebooks do, leaves no trace)."""
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = getattr(args, "log_level", None) or ("debug" if verbose else "warning" if quiet else "info")
    saved = (list(log.handlers), log.level, log.propagate)
    log.handlers[:] = [h for h in log.handlers if not isinstance(h, _OneHandler)]
    handler = _OneHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    if quiet:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            from huggingface_hub.utils import disable_progress_bars
        except ImportError:  # an old huggingface_hub: transformers' switch above covers its bars
            pass
        else:
            disable_progress_bars()

    def restore():
        log.handlers[:], log.level, log.propagate = saved
    return restore


def guarded(prog: str, command: Callable[[], int], verbose: bool = False) -> int:
    """Run a command: bad input is one line on stderr and exit 2 (a traceback
    too with --verbose); Ctrl-C is "interrupted" and exit 130."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
            ImportError, OSError, ArithmeticError) as e:
        # The user's to fix (mismatched models, a configuration beyond the model, a
        # missing file or package, a learning rate that overflows): one line, not a traceback.
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def write_text(path: str, text: str) -> None:
    """Write a whole file or nothing (`core.files.open_output`: atomic, symlinks
    followed, FIFOs and devices written in place, the umask honoured); "-" is
    the standard output."""
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    files.write_text(path, text)


def strict_json(obj):
    """`obj` with NaN and infinities as null: JSON has no NaN (json.dumps writes a bare
    NaN that strict readers refuse), and a number that could not be measured is missing."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    import json

    write_text(path, json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n")


@contextlib.contextmanager
def writing(option: str, path: str):
    """A failure to write `path` (a full disk, a directory gone, no permission)
    as one line naming `option`, not a traceback."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"{option}: cannot write {path!r} ({e.strerror or e})") from None


def generation_progress(max_new_tokens: int, desc: str, quiet: bool):
    """A `stopping_criteria` list for `generate` that advances a progress bar
    by one per generated token (it never stops generation), and the bar."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", disable=quiet, leave=False)

    class _Advance(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Advance()]), bar
