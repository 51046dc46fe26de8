"""Tensor indexing (x[index]): forward against NumPy, backward by gradcheck, torch and by hand (repeats sum)."""
import numpy as np
import pytest

import tinymoe as tm
from helpers import leaf
from tensor_oracles import tm_grads, torch_grads

# ----- indexing ----------------------------------------------------------------------------------------------
INDEX_CASES = [
    pytest.param((5,), 1, id="int"),
    pytest.param((5,), -1, id="negative-int"),
    pytest.param((5,), np.int64(3), id="numpy-int"),
    pytest.param((4, 5), (1, 2), id="int-pair"),
    pytest.param((4, 5), slice(1, 3), id="slice"),
    pytest.param((6,), slice(None, None, -2), id="negative-step"),
    pytest.param((4, 5), (slice(None), slice(0, None, 2)), id="strided-columns"),
    pytest.param((2, 3, 4), (Ellipsis, 1), id="ellipsis"),
    pytest.param((3, 4), (None, slice(None), 0), id="newaxis"),
    pytest.param((5,), [0, 0, 2, 0], id="repeated-list"),
    pytest.param((4, 3), np.array([3, 1, 3]), id="repeated-rows"),
    pytest.param((4, 3), (np.array([0, 0, 2]), np.array([1, 1, 1])), id="repeated-pairs"),
    pytest.param((4, 3), (slice(1, None), [2, 0, 2]), id="slice-and-repeated"),
    pytest.param((3, 4), (1, [0, 0, 3]), id="int-and-repeated"),
    pytest.param((2, 3), np.array([[True, False, True], [False, True, True]]), id="bool-mask"),
    pytest.param((3, 4), np.array([[0, 0], [2, 0]]), id="2d-index-array"),
]


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_forward_matches_numpy(shape, index):
    x = np.arange(float(np.prod(shape))).reshape(shape)
    out = tm.tensor(x, dtype="float64")[index]
    np.testing.assert_array_equal(out.numpy(), x[index])
    assert out.shape == x[index].shape


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_gradcheck(device, shape, index):
    x = np.random.default_rng(0).standard_normal(shape)
    assert tm.gradcheck(lambda t: t[index], [leaf(x, device)])


def _torch_index(index, shape):
    """The same selection for torch, which has no negative slice steps (they become index arrays)."""
    torch = pytest.importorskip("torch")
    parts = index if isinstance(index, tuple) else (index,)
    converted = []
    for dim, part in enumerate(parts):
        if isinstance(part, slice) and part.step is not None and part.step < 0:
            part = np.arange(shape[dim])[part]  # the cases using this put the slice on a real axis
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(part.copy())
        elif isinstance(part, np.integer):
            part = int(part)
        converted.append(part)
    return tuple(converted) if isinstance(index, tuple) else converted[0]


@pytest.mark.parametrize("shape, index", INDEX_CASES)
def test_getitem_gradient_matches_torch(shape, index):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    cotangent = rng.standard_normal(x[index].shape)
    torch_index = _torch_index(index, shape)
    (want,) = torch_grads(lambda t: t[torch_index], [x], cotangent)
    (got,) = tm_grads(lambda t: t[index], [x], cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_getitem_repeated_indices_sum_by_hand():
    x = leaf([10.0, 20.0, 30.0, 40.0])
    x[[0, 0, 2, 0]].backward(np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(x.grad, [7.0, 0.0, 3.0, 0.0])
    m = leaf(np.zeros((2, 2)))
    m[np.array([1, 1, 1]), np.array([0, 0, 1])].sum().backward()
    np.testing.assert_array_equal(m.grad, [[0.0, 0.0], [2.0, 1.0]])


def test_getitem_overlapping_slices_accumulate():
    x = leaf(np.arange(5.0))
    (x[1:4] * 2.0).sum().backward(retain_graph=False)
    (x[2:] + x[:3]).sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 3.0, 4.0, 3.0, 1.0])


def test_getitem_with_tensor_mask_passes_gradient_only_to_selected():
    x = leaf([-1.0, 2.0, -3.0, 4.0])
    mask = x > 0
    assert mask.requires_grad is False
    selected = x[mask]
    np.testing.assert_array_equal(selected.numpy(), [2.0, 4.0])
    (selected * selected).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 4.0, 0.0, 8.0])


def test_getitem_keeps_dtype_and_grad_dtype_float32():
    x = tm.tensor(np.arange(6.0).reshape(2, 3), dtype="float32", requires_grad=True)
    out = x[:, [0, 0]]
    assert out.dtype == np.float32
    out.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
