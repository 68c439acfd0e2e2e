import faulthandler
import os
import sys
import threading

import pytest
import torch

# No test may hang CI: past HARD_LIMIT_S, one test (its setup, module fixtures included, and teardown)
# prints every thread's stack and ends the run with exit code 1; faulthandler's own watchdog ends it
# a minute later if Python cannot run the timer. The longest, the pipeline smoke fixture, takes ~3 min.
HARD_LIMIT_S = 1200


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timer = threading.Timer(HARD_LIMIT_S, _time_out, args=(item,))
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(HARD_LIMIT_S + 60, exit=True)
    try:
        yield
    finally:
        timer.cancel()
        faulthandler.cancel_dump_traceback_later()


def _time_out(item):
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)  # so that the message reaches the terminal
    sys.stderr.write(f"\n{item.nodeid}: over the {HARD_LIMIT_S} s limit for one test; every thread's stack:\n")
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


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


# A test module's classifier data set and trained run, shaped by the module's own constants:
# CLF_DATA = (benign, malignant, images per patient); CLF_RUN = more trainer options (optional).
@pytest.fixture(scope="module")
def clf_data(request, root):
    from helpers import make_data
    benign, malignant, per_patient = request.module.CLF_DATA
    return make_data(root / "clf_data", benign, malignant, images_per_patient=per_patient)


@pytest.fixture(scope="module")
def clf_run(request, root, clf_data):
    """A classifier trained 2 steps on clf_data: its run folder (best.pt, last.pt)."""
    from helpers import clf_train_argv, trained
    from melano import classifier
    options = getattr(request.module, "CLF_RUN", {})
    trained(classifier.main, clf_train_argv(clf_data, root / "clf", max_steps=2, cache_dir=root / "cache", **options))
    return root / "clf"
