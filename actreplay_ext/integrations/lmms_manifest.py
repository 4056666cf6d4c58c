"""What lmms-eval 0.7's entry point group `lmms_eval.models` loads (see
pyproject.toml): the name `actreplay` and where its class lives. Kept to one
import, because lmms-eval imports every plugin's manifest on every run and
stops loading plugins at the first one that fails."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFESTS = [ModelManifest(model_id="actreplay", simple_class_path="actreplay_ext.integrations.lmms_eval.ActReplay")]
