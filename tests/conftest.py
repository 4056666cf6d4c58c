"""Fixtures only; the shared helpers are in tests/helpers.py (`import helpers`)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/: `import helpers` from any folder

from helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
