"""tinymoe.engine.workspace: large buffers on reused memory, never handed out twice while any view is alive."""
import gc
import os

import numpy as np
import pytest

from tinymoe.engine import workspace

BIG = (1024, 512)  # 2 MiB of float32: over MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_workspace():
    gc.collect()  # arrays of earlier tests caught in reference cycles return their blocks now, not mid-test
    workspace.release()
    workspace.set_limit(workspace.DEFAULT_LIMIT)
    yield
    workspace.release()
    workspace.set_limit(workspace.DEFAULT_LIMIT)


def address(array):
    return array.__array_interface__["data"][0]


def test_a_buffer_comes_back_once_its_array_is_gone():
    first = workspace.empty(BIG, np.float32)
    assert first.shape == BIG and first.dtype == np.float32 and first.flags.c_contiguous and first.flags.writeable
    where = address(first)
    del first
    before = workspace.stats()
    second = workspace.empty(BIG, np.float32)
    assert address(second) == where
    assert workspace.stats()["reused"] == before["reused"] + 1


def test_views_keep_the_buffer_in_use():
    first = workspace.empty(BIG, np.float32)
    first[...] = 7.0
    views = [first[3:5], first.T, first.reshape(-1)[::3], np.lib.stride_tricks.as_strided(first, shape=(4,))]
    where = address(first)
    del first
    gc.collect()
    taken = [workspace.empty(BIG, np.float32) for _ in range(3)]
    assert all(address(array) != where for array in taken)  # still held by the views: not handed out again
    for array in taken:
        array[...] = -1.0
    assert all((view == 7.0).all() for view in views)  # the views' data untouched
    del views, taken
    gc.collect()
    again = [workspace.empty(BIG, np.float32) for _ in range(4)]
    assert where in [address(array) for array in again]


def test_a_block_serves_a_somewhat_smaller_request_and_small_arrays_are_plain():
    block = workspace.empty((1024, 1024), np.float32)  # 4 MiB
    where = address(block)
    del block
    smaller = workspace.empty((1000, 1024), np.float64)  # 7.8 MiB: does not fit
    assert address(smaller) != where
    fits = workspace.empty((900, 1024), np.float32)  # 3.5 MiB: fits without wasting more than the slack
    assert address(fits) == where
    small = workspace.empty((10, 10), np.float32)
    assert small.flags.owndata and small.base is None  # under MIN_BYTES: np.empty's own array


def test_limit_and_release():
    arrays = [workspace.empty(BIG, np.float32) for _ in range(3)]
    del arrays
    assert workspace.stats()["free_blocks"] == 3
    workspace.set_limit(2 * 2**21)  # room for two 2 MiB blocks
    assert workspace.stats()["free_blocks"] == 2 and workspace.stats()["free_bytes"] == 2 * 2**21
    workspace.release()
    assert workspace.stats() | {"reused": 0, "created": 0} == {"free_bytes": 0, "free_blocks": 0, "reused": 0,
                                                                "created": 0}
    workspace.set_limit(0)
    array = workspace.empty(BIG, np.float32)
    del array
    assert workspace.stats()["free_blocks"] == 0
    with pytest.raises(ValueError, match=r"workspace.set_limit: n_bytes=-1 must be >= 0"):
        workspace.set_limit(-1)
    for bad in (1.5, True, "1"):
        with pytest.raises(TypeError, match=r"workspace.set_limit: n_bytes=.* must be an int"):
            workspace.set_limit(bad)


def test_other_array_modules_get_their_own_empty():
    class FakeModule:
        @staticmethod
        def empty(shape, dtype):
            return ("fake", shape, dtype)
    assert workspace.empty(BIG, np.float32, FakeModule) == ("fake", BIG, np.dtype(np.float32))


def test_moe_training_steps_reach_a_steady_state_without_new_buffers():
    import tinymoe as tm

    moe = tm.nn.MoE(d_model=256, d_ff=512, n_experts=4, top_k=2, generator=np.random.default_rng(0))
    x = tm.tensor(np.random.default_rng(1).standard_normal((2048, 256)).astype(np.float32), requires_grad=True)

    def step():
        moe.zero_grad()
        x.grad = None
        (moe(x) ** 2).sum().backward()
        return [parameter.grad.copy() for parameter in moe.parameters()] + [x.grad.copy()]

    first = step()
    step(), step()  # a step's gradients live on into the next one's forward: the free list grows twice
    created = workspace.stats()["created"]
    assert created > 0
    last = [step() for _ in range(3)][-1]
    assert workspace.stats()["created"] == created  # every large buffer came from the free list
    for a, b in zip(first, last):
        np.testing.assert_array_equal(a, b)  # reused memory changes no value


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_share_workspace_memory():
    array = workspace.empty(BIG, np.float32)
    array[...] = 1.0
    pid = os.fork()
    if pid == 0:  # the child writes into its copy and leaves at once
        array[...] = 2.0
        os._exit(0)
    os.waitpid(pid, 0)
    assert (array == 1.0).all()  # private memory: the child's write is its own


def test_a_block_returned_while_the_lock_is_held_does_not_deadlock():
    """Finalizers may run on the thread that holds the workspace's lock (a garbage collection inside it)."""
    array = workspace.empty(BIG, np.float32)
    with workspace._lock:
        del array  # the finalizer runs here, under the lock: it must not wait for it
    assert workspace.stats()["free_blocks"] == 1


def test_the_default_limit_is_a_quarter_of_the_memory_this_process_may_use():
    assert workspace.DEFAULT_LIMIT == workspace._memory_bytes() // 4
    assert 0 < workspace._memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
