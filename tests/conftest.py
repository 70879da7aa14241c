"""Test tiers by marker: ``distributed`` (real gloo processes), ``gpu`` (skipped without CUDA), ``slow``."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
