"""Bench collection (bench_*.py) and seeding; the measuring helpers are in benchutil.py."""
import os
import sys

import pytest
import torch

# The benches measure this checkout (an in-place build works without installing it).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collect_file(file_path, parent):
    # pyproject's python_files is test_*.py; collect bench_*.py here too, unless named on the command line
    # (pytest collects those itself).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
