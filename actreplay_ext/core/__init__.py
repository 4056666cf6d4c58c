"""The replay engine, one idea per module:

- results.py     ReplayTargets, ReplayResult and their files
- files.py       writing any output file without damaging what is there (`open_output`)
- validation.py  config-for-model and targets-for-prompt checks
- reentry.py     the guard that keeps patch() hooks out of the library's own forwards
- layers.py      THE decoder-layer runner (`run_layers`) and what layers take (`LayerInputs`)
- prefill.py     capturing a prompt's layer-0 input (`capture_prefill`)
- batching.py    identical rows optimised once (`distinct_rows`)
- images.py      what identifies a prompt's images beyond its input_ids (`image_hashes`)
- targets.py     the base pass and selection (`compute_targets`)
- optimize.py    the loss plan and the offset descent (`optimize`)
- direct.py      direct cross-model substitution (`plan_direct`)

Imports run one way: core -> models -> ops; the hooks build on core.
"""

from .batching import distinct_rows
from .direct import DirectPlan, plan_direct, substitute
from .images import image_hashes, images_differ, vision_dtype
from .layers import AUTO_CHECKPOINT_TOKENS, LayerInputs, lens_params, loop_autograd, run_layers
from .optimize import LossPlan, optimize, optimize_from_prefill, replay_loss
from .prefill import Prefill, capture_prefill, layer_inputs, record_layer_loop
from .reentry import in_internal_forward, internal_forward
from .results import ReplayResult, ReplayTargets
from .targets import compute_targets, select, targets_from_prefill
from .validation import check_config_for, check_targets, model_info, target_config

__all__ = ["AUTO_CHECKPOINT_TOKENS", "DirectPlan", "LayerInputs", "LossPlan", "Prefill", "ReplayResult",
           "ReplayTargets", "capture_prefill", "check_config_for", "check_targets", "compute_targets", "distinct_rows",
           "image_hashes", "images_differ", "in_internal_forward", "internal_forward", "layer_inputs", "lens_params",
           "loop_autograd", "model_info", "optimize", "optimize_from_prefill", "plan_direct", "record_layer_loop",
           "replay_loss", "run_layers", "select", "substitute", "target_config", "targets_from_prefill", "vision_dtype"]
