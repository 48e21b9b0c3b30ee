import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def pytest_collection_modifyitems(config, items):
    for item in items:  # a test parametrized on the CUDA device is a CUDA test (`pytest -m cuda` on a GPU)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "cuda" in map(str, callspec.params.values()):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
