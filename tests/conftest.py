"""Shared test setup: seeds, and the Triton interpreter on machines without a GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e. before univ_kernels is
imported, so it is set here at collection time.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _own_hash_cache(tmp_path_factory):
    """The content-hash cache (univ.run.hashes) in a folder of the session's, never the user's ~/.cache."""
    os.environ["UNIV_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "hashes.json")
    yield


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
