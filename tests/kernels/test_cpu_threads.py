"""The CPU kernels' thread pool (tinymoe.kernels.cpu_threads): row ranges, and the Numba kernels split over it
give the same bits as one range on one thread, and never start Numba's own (parallel=True) threads."""
import numpy as np
import pytest

from tinymoe.kernels import cpu_threads

numba = pytest.importorskip("numba")
from tinymoe.kernels import numba_cpu, reference  # noqa: E402


@pytest.mark.parametrize("n_rows, parts", [(10, 3), (1, 4), (7, 7), (100, 2), (5, 1)])
def test_row_ranges_cover_the_rows_once_in_order(n_rows, parts):
    ranges = cpu_threads.row_ranges(n_rows, parts)
    assert [row for start, stop in ranges for row in range(start, stop)] == list(range(n_rows))
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and len(ranges) == min(parts, n_rows)


def test_run_all_keeps_the_order_and_runs_nested_work_inline():
    def outer(item):
        assert cpu_threads.in_worker() or cpu_threads.cores() < 2
        return cpu_threads.run_all(lambda inner: item * 10 + inner, range(3))  # from a worker: inline, no deadlock
    assert cpu_threads.run_all(outer, range(5)) == [[i * 10 + j for j in range(3)] for i in range(5)]


def _calls(rng):
    x = rng.standard_normal((300, 40))
    index = rng.integers(0, 300, 500)
    y = rng.standard_normal((500, 40))
    pairs = rng.permutation(600)[:600].reshape(300, 2) % 500
    pairs[::7, 1] = -1
    weights = rng.standard_normal((300, 2))
    gate_up = rng.standard_normal((300, 80))
    grad_h = rng.standard_normal((300, 40))
    return {
        "gather_rows": lambda k: k.gather_rows(x, index, rng_scale),
        "combine_rows": lambda k: k.combine_rows(y, pairs, weights),
        "combine_weights_grad": lambda k: k.combine_weights_grad(x, y, pairs),
        "scatter_add_rows": lambda k: k.scatter_add_rows(y, index, 300),
        "swiglu": lambda k: k.swiglu(gate_up[:, :40], gate_up[:, 40:]),
        "swiglu_backward": lambda k: k.swiglu_backward(gate_up[:, :40], gate_up[:, 40:], grad_h),
    }


rng_scale = np.random.default_rng(3).standard_normal(500)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("primitive", ["gather_rows", "combine_rows", "combine_weights_grad", "scatter_add_rows",
                                       "swiglu", "swiglu_backward"])
def test_kernels_over_the_pool_match_one_range_and_the_reference(primitive, monkeypatch):
    call = _calls(np.random.default_rng(0))[primitive]
    one_range = _as_tuple(call(numba_cpu))  # these sizes run as one range on the calling thread
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_ELEMENTS", 0)  # every call over one range per core
    monkeypatch.setattr(cpu_threads, "cores", lambda: 3)  # more ranges than this machine may have cores
    pooled = _as_tuple(call(numba_cpu))
    for got, want in zip(pooled, one_range):
        np.testing.assert_array_equal(got, want)  # same bits: each row has one owner and one order of sums
    for got, want in zip(pooled, _as_tuple(call(reference))):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_no_kernel_is_a_numba_parallel_region():
    """Each kernel is a plain loop that releases the GIL: the pool gives the parallelism, Numba's threading
    layer is never launched (its threads spin after each region and cost ~10 µs per launch)."""
    from numba.core.registry import CPUDispatcher

    from tinymoe.kernels import numba_swiglu
    kernels = [value for module in (numba_cpu, numba_swiglu) for value in vars(module).values()
               if isinstance(value, CPUDispatcher)]
    assert len(kernels) >= 7
    for kernel in kernels:
        assert not kernel.targetoptions.get("parallel"), kernel
    pooled = {kernel.py_func.__name__: kernel for kernel in kernels}
    for name in ("_gather_rows", "_combine_rows", "_combine_weights_grad", "_sum_segments", "_swiglu",
                 "_swiglu_backward", "_swiglu_backward_in_place"):
        assert pooled[name].targetoptions.get("nogil"), name  # else the pool's threads would take turns
        assert pooled[name].targetoptions.get("error_model") == "numpy", name  # else no SIMD (division checks)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_pool_of_its_own(monkeypatch):
    import os
    import signal

    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setattr(cpu_threads, "cores", lambda: 2)
    out = np.zeros(10)
    cpu_threads.for_rows(10, lambda start, stop: out.__setitem__(slice(start, stop), 1.0), 10)  # the pool exists
    pid = os.fork()
    if pid == 0:  # the parent's pool threads did not survive the fork: the child must not wait on them
        signal.alarm(20)
        child = np.zeros(10)
        cpu_threads.for_rows(10, lambda start, stop: child.__setitem__(slice(start, stop), 2.0), 10)
        os._exit(0 if (child == 2.0).all() else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert (out == 1.0).all()


def test_the_callers_error_wins_and_the_workers_are_waited_for(monkeypatch):
    monkeypatch.setattr(cpu_threads, "MIN_PARALLEL_ELEMENTS", 0)
    monkeypatch.setattr(cpu_threads, "cores", lambda: 2)
    done = []

    def call(start, stop):
        if start == 0:
            raise KeyError("caller's range")
        done.append(start)
        raise RuntimeError("worker's range")

    with pytest.raises(KeyError, match="caller's range"):
        cpu_threads.for_rows(10, call, 10)
    assert done == [5]  # the worker's range ran to its end before for_rows returned
