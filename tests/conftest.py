"""Test setup shared by every test module.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before
triton decorates the kernels, i.e. before embedkit (and its Triton kernels, embedkit._triton) is first imported, so it is
set here, at conftest import time.

Test helpers are imported by their plain module names (`from conftest import DEVICE`, `from numerics
import ...`, `import hopper_aot`): tests/ has no __init__.py, so pytest puts tests/ on sys.path and
imports each file under its basename. An import as `tests.conftest` would load this file a second
time, under a second name (and patch the launch recorder in twice); tests/test_compile_for_hopper.py
checks that it does not happen.

Order of a run (`pytest_collection_modifyitems`): the fast tier first, then the `slow`-marked tier,
then the tests marked `after_all` (the sm_90 compile of every kernel specialization the other tests
launched, which must come after all of them). `-m "not slow"` runs the fast tier alone.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import embedkit  # noqa: E402
import hopper_aot  # noqa: E402

# Record every interpreted kernel launch, to compile each specialization for sm_90 at the end.
if os.environ.get("TRITON_INTERPRET") == "1":
    hopper_aot.install_recorder()

settings.register_profile(
    "default", deadline=None, max_examples=20, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _tier(item) -> int:
    if item.get_closest_marker("after_all") is not None:
        return 2
    return 1 if item.get_closest_marker("slow") is not None else 0


def pytest_collection_modifyitems(config, items):
    # Stable: within a tier the tests keep their file and definition order.
    items.sort(key=_tier)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_global_settings():
    """Each test starts on backend 'auto' with validation on, whatever the previous test did
    (process-wide backend and this thread's use_backend / set_validation state)."""
    embedkit._config._reset_for_tests()
    yield
    embedkit._config._reset_for_tests()


@pytest.fixture
def device():
    return DEVICE
