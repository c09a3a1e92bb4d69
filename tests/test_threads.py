"""use_backend and set_validation are per thread; set_backend is process-wide; torch.compile guards
on the calling thread's choice (issue 12, "Threads")."""
import threading

import pytest
import torch

import embedkit
from embedkit import _config
from embedkit.ops import _dispatch


def _run_threads(*targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_interleaved_use_backend_blocks_do_not_leak_between_threads():
    # A enters "reference", B enters "native", A exits, B checks, B exits, A checks: with a
    # process-global save/restore, B's block saw A's exit and the process ended on "reference".
    b1, b2, b3 = threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10), threading.Barrier(2, timeout=10)
    seen = {}

    def a():
        with embedkit.use_backend("reference"):
            b1.wait()  # B enters its block after this
            b2.wait()
            seen["a_inside"] = embedkit.get_backend()
        b3.wait()
        seen["a_after"] = embedkit.get_backend()

    def b():
        b1.wait()
        with embedkit.use_backend("native"):
            b2.wait()
            b3.wait()  # A has left its block
            seen["b_inside"] = embedkit.get_backend()
        seen["b_after"] = embedkit.get_backend()

    _run_threads(a, b)
    assert seen == {"a_inside": "reference", "b_inside": "native", "a_after": "auto", "b_after": "auto"}
    assert embedkit.get_backend() == "auto"


def test_use_backend_in_a_thread_steers_that_threads_ops_only():
    barrier = threading.Barrier(2, timeout=10)
    resolved = {}

    def a():
        with embedkit.use_backend("reference"):
            barrier.wait()
            barrier.wait()
            resolved["a"] = _dispatch.resolve("pool_project", torch.device("cpu"))

    def b():
        barrier.wait()
        resolved["b"] = embedkit.get_backend()
        barrier.wait()

    _run_threads(a, b)
    assert resolved == {"a": "reference", "b": "auto"}


def test_set_backend_is_process_wide_and_use_backend_wins_in_its_thread():
    barrier = threading.Barrier(2, timeout=10)
    seen = {}

    def a():
        with embedkit.use_backend("native"):
            barrier.wait()  # main thread's set_backend happens in b
            barrier.wait()
            seen["a"] = embedkit.get_backend()
        seen["a_after"] = embedkit.get_backend()

    def b():
        barrier.wait()
        embedkit.set_backend("reference")
        barrier.wait()
        seen["b"] = embedkit.get_backend()

    _run_threads(a, b)
    assert seen == {"a": "native", "a_after": "reference", "b": "reference"}
    assert embedkit.get_backend() == "reference"


def test_set_validation_off_in_one_thread_does_not_skip_checks_in_another():
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    bad_cu = torch.tensor([0, 2, 6, 6], dtype=torch.int32)  # an empty sequence: a content check
    barrier = threading.Barrier(2, timeout=10)
    seen = {}

    def lax():
        embedkit.set_validation(False)
        barrier.wait()
        barrier.wait()
        seen["lax"] = embedkit.validation_enabled()
        seen["lax_nan"] = bool(torch.isnan(embedkit.pool_project(h, bad_cu, w)[2]).all())

    def strict():
        barrier.wait()  # the other thread has switched validation off
        seen["strict"] = embedkit.validation_enabled()
        with pytest.raises(ValueError, match="sequence 2 is empty"):
            embedkit.pool_project(h, bad_cu, w)
        barrier.wait()

    _run_threads(lax, strict)
    assert seen == {"lax": False, "lax_nan": True, "strict": True}
    assert embedkit.validation_enabled()  # the main thread was never switched off


def test_compiled_function_guards_on_backend_and_validation():
    # dynamo reads the thread-local settings and guards on them: a change recompiles, never a stale
    # constant. fullgraph: reading the settings does not break the graph.
    def f(x):
        return x + len(_config.get_backend()) + (100 if _config.validation_enabled() else 0)

    g = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.zeros(2)
    assert g(x).tolist() == [104.0, 104.0]  # "auto", validation on
    with embedkit.use_backend("reference"):
        assert g(x).tolist() == [109.0, 109.0]
        embedkit.set_validation(False)
        assert g(x).tolist() == [9.0, 9.0]
        embedkit.set_validation(True)
    embedkit.set_backend("native")
    assert g(x).tolist() == [106.0, 106.0]
    out = {}

    def other():  # a fresh thread: process-wide "native", its own validation (on)
        out["v"] = g(x).tolist()
        with embedkit.use_backend("reference"):
            out["r"] = g(x).tolist()

    _run_threads(other)
    assert out == {"v": [106.0, 106.0], "r": [109.0, 109.0]}


def test_compiled_op_follows_use_backend():
    h = torch.randn(6, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    w = torch.randn(5, 4)
    g = torch.compile(lambda h, cu, w: embedkit.pool_project(h, cu, w), backend="aot_eager", fullgraph=True)
    with embedkit.use_backend("reference"):
        want = embedkit.pool_project(h, cu, w)
        got_ref = g(h, cu, w)
    avail = _dispatch.available_backends("pool_project")
    torch.testing.assert_close(got_ref, want)
    if "native" in avail:
        with embedkit.use_backend("native"):
            torch.testing.assert_close(g(h, cu, w), want, rtol=1e-5, atol=1e-5)
    # a backend that cannot run here must raise inside the compiled function too (guard, not stale)
    with embedkit.use_backend("triton"):
        if "triton" not in avail:
            with pytest.raises(Exception, match="triton"):
                g(h, cu, w)
