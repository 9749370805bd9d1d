import os

import pytest
import torch


# One intra-op thread per test process: the suite runs under pytest-xdist (one worker per core), and tiny ops
# on a busy 2-core machine are far slower with thread contention than single-threaded.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
