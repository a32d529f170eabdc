"""pytest-benchmark setup: seeds, and the device and versions recorded with every saved run.

Run with ``python3 -m pytest bench/ --benchmark-only``; plain ``pytest`` from the repo root never collects
this folder (``testpaths = ["tests"]``).
"""

import random

import pytest
import torch

from bench.common import default_device, device_name, versions


def pytest_benchmark_update_machine_info(config, machine_info):
    device = default_device()
    machine_info["device"] = device_name(device)
    machine_info.update(versions())


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def device():
    return default_device()
