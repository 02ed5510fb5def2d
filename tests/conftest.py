import atexit
import os
import random
import shutil
import tempfile
import zlib

import pytest
import torch

# The Triton kernels run on CPU tensors under the interpreter; triton.jit reads this when the
# kernel modules are imported, so it must be set before anything imports sgm_ext.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("SGM_EXT_BACKEND", None)
# torch.compile's on-disk caches (inductor, FX graphs, compiled bytecode) are per user, shared by
# every checkout on the machine: a graph cached by another checkout whose ops had another schema
# was served here and called sgm_ext::act_mul_scale with an argument too many. Each test session
# compiles into a fresh directory of its own (as on a clean CI machine); xdist workers inherit it.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sgm-ext-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# Fresh random inputs every run; the seed is printed so a failure can be replayed with
# SGM_EXT_TEST_SEED=<seed>.
SEED = int(os.environ.get("SGM_EXT_TEST_SEED") or random.SystemRandom().randrange(2**31))
# pytest-xdist's workers (the GPU run) start after this and inherit it: one seed for the run,
# the one in the header, rather than one per worker that nothing prints
os.environ["SGM_EXT_TEST_SEED"] = str(SEED)


def pytest_report_header(config):
    return f"sgm-ext test seed: {SEED} (replay with SGM_EXT_TEST_SEED={SEED})"


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the session seed and the test's name."""
    g = torch.Generator()
    g.manual_seed((SEED + zlib.crc32(request.node.nodeid.encode())) % 2**63)
    return g


# The GPU run (scripts/run_tests.sh sets SGM_EXT_GPU_RUN=1 for tests/test_gpu.py on a GPU
# machine): a skip there means a GPU, a backend or a case is missing, so it is reported as a
# failure; otherwise a run on a machine whose GPU torch cannot see would pass with every test
# skipped.
GPU_RUN = os.environ.get("SGM_EXT_GPU_RUN") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if GPU_RUN and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in the GPU run (SGM_EXT_GPU_RUN=1), where nothing may: {reason}"
