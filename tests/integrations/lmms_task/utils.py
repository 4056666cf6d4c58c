"""The local task's document functions (lmms-eval loads them with `!function`)."""

import os
import re

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, path)).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def _normal(text):
    return re.sub(r"\s+", " ", str(text).strip().lower())


def process_results(doc, results):
    return {"exact_match": float(_normal(results[0]) == _normal(doc["answer"]))}
