"""Small test utilities shared by the test modules."""
import numpy as np

import tinymoe as tm


def host(value):
    """A NumPy array of a Tensor's or a device array's data."""
    if isinstance(value, tm.Tensor):
        return value.numpy()
    from tinymoe.engine.backend import to_numpy

    return to_numpy(value)


def leaf(array, device="cpu", dtype="float64", requires_grad=True):
    """A leaf tensor holding `array` on `device`."""
    return tm.tensor(np.asarray(array), requires_grad=requires_grad, dtype=dtype, device=device)


def assert_close(actual, expected, rtol=1e-6, atol=1e-8):
    np.testing.assert_allclose(host(actual), host(expected), rtol=rtol, atol=atol)
