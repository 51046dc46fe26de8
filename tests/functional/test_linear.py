"""linear and matmul: values against NumPy einsum, gradients, broadcasting of batch axes, shape errors."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from helpers import host, leaf

HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("x_shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_einsum_and_gradchecks(device, x_shape, with_bias):
    rng = np.random.default_rng(0)
    x, weight, bias = rng.standard_normal(x_shape), rng.standard_normal((4, 5)), rng.standard_normal(4)
    expected = np.einsum("...i,oi->...o", x, weight) + (bias if with_bias else 0.0)
    inputs = [leaf(x, device), leaf(weight, device)] + ([leaf(bias, device)] if with_bias else [])
    out = F.linear(*inputs)
    assert out.shape == x_shape[:-1] + (4,)
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-14)
    assert tm.gradcheck(F.linear, inputs)


def test_linear_matches_torch(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, weight, bias = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    cotangent = rng.standard_normal((2, 3, 4))
    ours = [leaf(x, device), leaf(weight, device), leaf(bias, device)]
    out = F.linear(*ours)
    out.backward(cotangent)
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, weight, bias)]
    expected = torch.nn.functional.linear(*theirs)
    expected.backward(torch.tensor(cotangent))
    np.testing.assert_allclose(host(out), expected.detach().numpy(), rtol=1e-12)
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(host(mine.grad), reference.grad.numpy(), rtol=1e-12, atol=1e-14)


def test_linear_only_computes_the_gradients_asked_for(device):
    rng = np.random.default_rng(2)
    x = leaf(rng.standard_normal((3, 5)), device, requires_grad=False)
    weight, bias = leaf(rng.standard_normal((4, 5)), device), leaf(rng.standard_normal(4), device, requires_grad=False)
    F.linear(x, weight, bias).sum().backward()
    assert x.grad is None and bias.grad is None
    np.testing.assert_allclose(host(weight.grad), np.tile(host(x).sum(axis=0), (4, 1)), rtol=1e-12)


def test_linear_float32_is_close_to_float64(device):
    rng = np.random.default_rng(3)
    x, weight, bias = rng.standard_normal((6, 8)), rng.standard_normal((3, 8)), rng.standard_normal(3)
    out32 = F.linear(*(leaf(a, device, dtype="float32") for a in (x, weight, bias)))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(host(out32), host(F.linear(*(leaf(a, device) for a in (x, weight, bias)))),
                               rtol=1e-5, atol=1e-5)


def test_linear_rejects_bad_input(device):
    x, weight = leaf(np.zeros((2, 5)), device), leaf(np.zeros((4, 5)), device)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 6\) but x of shape \(2, 5\) needs weight of shape"):
        F.linear(x, leaf(np.zeros((4, 6)), device))
    with pytest.raises(ValueError, match=r"weight has shape \(5,\)"):
        F.linear(x, leaf(np.zeros(5), device))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(4,\)"):
        F.linear(x, weight, leaf(np.zeros(5), device))
    with pytest.raises(TypeError, match=r"\bx must be a Tensor"):
        F.linear(np.zeros((2, 5)), weight)
    with pytest.raises(TypeError, match=r"bias must be a Tensor"):
        F.linear(x, weight, np.zeros(4))
    with pytest.raises(TypeError, match=r"weight is float32 but x is float64"):
        F.linear(x, leaf(np.zeros((4, 5)), device, dtype="float32"))
    with pytest.raises(ValueError, match=r"x is 0-d"):
        F.linear(leaf(1.0, device), weight)


# ----- matmul ------------------------------------------------------------------------------------------


@st.composite
def broadcastable_matmul_shapes(draw):
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    a_batch = [size if draw(st.booleans()) else 1 for size in batch]
    b_batch = [size if draw(st.booleans()) else 1 for size in batch][draw(st.integers(0, len(batch))):]
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    a_shape = tuple(a_batch) + (m, k) if draw(st.booleans()) or batch else (k,)
    b_shape = tuple(b_batch) + (k, n) if draw(st.booleans()) or batch else (k,)
    return a_shape, b_shape


@given(shapes=broadcastable_matmul_shapes(), seed=st.integers(0, 2**16))
@HYPOTHESIS
def test_matmul_matches_numpy_and_gradchecks_with_broadcast_batches(device, shapes, seed):
    a_shape, b_shape = shapes
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
    ta, tb = leaf(a, device), leaf(b, device)
    out = F.matmul(ta, tb)
    # An independent spelling of a @ b: broadcast explicitly, then sum the products over k.
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    expected = (a2[..., :, :, None] * b2[..., None, :, :]).sum(axis=-2)
    if a.ndim == 1:
        expected = expected[..., 0, :]
    if b.ndim == 1:
        expected = expected[..., 0]
    np.testing.assert_allclose(host(out), expected, rtol=1e-12, atol=1e-13)
    assert tm.gradcheck(F.matmul, [ta, tb])


def test_matmul_rejects_bad_input(device):
    a = leaf(np.zeros((2, 3)), device)
    with pytest.raises(ValueError, match=r"a has shape \(2, 3\) and b has shape \(4, 2\); a's last axis \(3\)"):
        F.matmul(a, leaf(np.zeros((4, 2)), device))
    with pytest.raises(ValueError, match=r"batch axes of a \(2,\) and b \(3,\) do not broadcast"):
        F.matmul(leaf(np.zeros((2, 2, 3)), device), leaf(np.zeros((3, 3, 1)), device))
    with pytest.raises(ValueError, match=r"\bb is 0-d"):
        F.matmul(a, leaf(2.0, device))
    with pytest.raises(TypeError, match=r"\bb must be a Tensor"):
        F.matmul(a, np.zeros((3, 1)))
    with pytest.raises(TypeError, match=r"\bb is float32 but a is float64"):
        F.matmul(a, leaf(np.zeros((3, 1)), device, dtype="float32"))


@pytest.mark.parametrize("out_features", [8, 17])  # a router's few experts (einsum loops) and a wider layer (BLAS)
def test_linear_input_gradient_on_both_sides_of_the_small_inner_dimension(device, out_features):
    from tinymoe.functional.linear import SMALL_INNER_DIMENSION
    assert 8 <= SMALL_INNER_DIMENSION < 17  # so the two cases take the two paths
    rng = np.random.default_rng(5)
    x, weight = rng.standard_normal((6, 5)), rng.standard_normal((out_features, 5))
    assert tm.gradcheck(F.linear, [leaf(x, device), leaf(weight, device)])
    x32 = rng.standard_normal((300, 64)).astype(np.float32)
    w32 = (0.1 * rng.standard_normal((out_features, 64))).astype(np.float32)
    cotangent = rng.standard_normal((300, out_features)).astype(np.float32)
    grads = []
    for _ in range(2):
        x_leaf = leaf(x32, device, dtype="float32")
        (F.linear(x_leaf, leaf(w32, device, dtype="float32")) * tm.tensor(cotangent, device=device)).sum().backward()
        grads.append(host(x_leaf.grad))
    np.testing.assert_array_equal(grads[0], grads[1])  # deterministic
    exact = cotangent.astype(np.float64) @ w32.astype(np.float64)
    np.testing.assert_allclose(grads[0], exact, rtol=1e-5, atol=1e-5)


def test_a_small_backward_gives_the_bits_of_its_products_taken_alone(monkeypatch):
    """With threadpoolctl the two products of a router-sized backward run side by side on the kernels' pool;
    each must equal the same product computed alone on one BLAS thread, bit for bit, and land in its place."""
    from tinymoe.kernels import cpu_threads
    if cpu_threads.blas_controller() is None:
        pytest.skip("needs threadpoolctl (without it the products run in turn)")
    import importlib
    linear_module = importlib.import_module("tinymoe.functional.linear")  # the name alone is the function
    calls = []

    def counted_run_all(work, items):
        calls.append(1)
        return cpu_threads.run_all(work, items)
    monkeypatch.setattr(linear_module, "run_all", counted_run_all)
    rng = np.random.default_rng(6)
    monkeypatch.setattr(linear_module, "MIN_PARALLEL_ELEMENTS", 0)  # a small problem, over the pool anyway
    x = rng.standard_normal((700, 48)).astype(np.float32)
    weight = (0.1 * rng.standard_normal((8, 48))).astype(np.float32)
    cotangent = rng.standard_normal((700, 8)).astype(np.float32)
    x_leaf, w_leaf = leaf(x, "cpu", dtype="float32"), leaf(weight, "cpu", dtype="float32")
    (F.linear(x_leaf, w_leaf) * tm.tensor(cotangent)).sum().backward()
    assert calls == [1]
    alone_x = cpu_threads.one_thread_blas(lambda: cotangent @ weight)
    alone_w = cpu_threads.one_thread_blas(lambda: cotangent.T @ x)
    np.testing.assert_array_equal(x_leaf.grad, alone_x)
    np.testing.assert_array_equal(w_leaf.grad, alone_w)
    np.testing.assert_allclose(w_leaf.grad, cotangent.astype(np.float64).T @ x, rtol=1e-4, atol=1e-4)
