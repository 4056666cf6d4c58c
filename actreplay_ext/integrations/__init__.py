"""Bridges to the evaluation harnesses researchers already use. Each module
imports its harness lazily (an optional extra): the core package never needs it.

* `lmms_eval`: an lmms-eval model, ``--model actreplay`` (the ``lmms`` extra);
  `lmms_manifest` is what lmms-eval's entry point loads to find it, `lmms_files`
  where it writes its offsets (importable without lmms-eval).
"""
