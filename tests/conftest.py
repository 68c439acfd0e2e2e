import os

import pytest
import torch


def pytest_sessionstart(session):
    # bench/gpu_check.sh sets MELANO_OPS=ext (the compiled op or an error): load the kernels before any
    # test builds a model, so that no test meets an unloaded library because of the order tests run in
    if os.environ.get("MELANO_OPS") == "ext":
        from melano.infra import kernels
        kernels.load()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores it is several times faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def root(request, tmp_path_factory):
    """A folder the tests of one module share (their data sets and trained runs)."""
    return tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
