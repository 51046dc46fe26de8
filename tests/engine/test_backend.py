"""Backend selection, devices, dtypes, lazy imports and the seedable constructors (zeros, ones, randn, rand)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.engine import backend

CUDA_ONLY = pytest.mark.skipif(not tm.cuda_available(), reason="needs CuPy and a CUDA device")


# ----- lazy imports ----------------------------------------------------------------------------------------
def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that imports this checkout of tinymoe."""
    repo_root = str(Path(tm.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_import_tinymoe_imports_neither_cupy_nor_numba():
    result = _run_python("import tinymoe, sys; assert 'cupy' not in sys.modules and 'numba' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_cpu_forward_and_backward_import_neither_cupy_nor_numba():
    code = (
        "import sys, tinymoe as tm\n"
        "x = tm.randn(3, 4, generator=0, requires_grad=True)\n"
        "w = tm.rand(4, 2, generator=1, requires_grad=True)\n"
        "loss = ((x @ w) ** 2).mean() + x[[0, 0]].max() - (2.0 / (1.0 + w)).sum()\n"
        "loss.backward()\n"
        "assert x.grad is not None and x.device == 'cpu'\n"
        "assert 'cupy' not in sys.modules, 'cupy imported'\n"
        "assert 'numba' not in sys.modules, 'numba imported'\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_missing_cupy_raises_backend_unavailable_naming_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(backend, "_cupy_module", None)
    with pytest.raises(tm.BackendUnavailableError, match="CuPy"):
        backend.import_cupy()
    assert tm.cuda_available() is False
    with pytest.raises(tm.BackendUnavailableError, match="CuPy"):
        tm.tensor([1.0], device="cuda")
    with pytest.raises(tm.BackendUnavailableError, match="CuPy"):
        tm.zeros(2, device="cuda")
    with pytest.raises(tm.BackendUnavailableError, match="CuPy"):
        tm.tensor([1.0]).to("cuda")


def test_import_optional_names_the_purpose_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "some_optional_package", None)
    with pytest.raises(tm.BackendUnavailableError) as caught:
        backend.import_optional("some_optional_package", "'tinymoe[extra]'", "the frobnicator needs some_package")
    assert str(caught.value) == ("the frobnicator needs some_package, which is not installed: "
                                 "pip install 'tinymoe[extra]'")
    assert isinstance(caught.value.__cause__, ImportError)
    assert backend.import_optional("json", "'json'", "never shown") is sys.modules["json"]


def test_backend_unavailable_is_an_import_error():
    assert issubclass(tm.BackendUnavailableError, ImportError)


@pytest.mark.skipif(tm.cuda_available(), reason="checks the error seen without a usable GPU")
def test_cuda_request_without_gpu_is_a_clear_error():
    with pytest.raises(tm.BackendUnavailableError, match="(?i)cupy|cuda"):
        tm.tensor([1.0, 2.0], device="cuda")


def test_missing_numba_raises_backend_unavailable_naming_numba(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` raise ImportError
    with pytest.raises(tm.BackendUnavailableError, match="numba"):
        backend.import_numba()
    assert tm.numba_available() is False


def test_numba_is_found_when_installed(monkeypatch):
    numba = pytest.importorskip("numba")
    assert backend.import_numba() is numba
    assert tm.numba_available() is True


# ----- array module and devices ----------------------------------------------------------------------------
def test_array_module_and_device_of_numpy_data():
    array = np.zeros(3)
    assert backend.array_module(array) is np
    assert backend.array_module([1.0, 2.0]) is np
    assert backend.device_of(array) == "cpu"
    t = tm.tensor(array)
    assert t.device == "cpu" and t.xp is np and isinstance(t.data, np.ndarray)


@pytest.mark.parametrize("spelling, expected", [
    (None, "cpu"), ("cpu", "cpu"), ("CPU", "cpu"), (" cpu ", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda"),
])
def test_normalize_device_accepts(spelling, expected):
    assert backend.normalize_device(spelling) == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:1", "tpu", "", 0, 1.5])
def test_bad_device_is_rejected_naming_value_and_choices(bad):
    with pytest.raises(ValueError) as info:
        tm.tensor([1.0], device=bad)
    message = str(info.value)
    assert repr(bad) in message and "device" in message and "'cpu'" in message and "'cuda'" in message


@pytest.mark.parametrize("make", [
    lambda: tm.zeros(2, device="gpu"),
    lambda: tm.ones(2, device="gpu"),
    lambda: tm.randn(2, device="gpu"),
    lambda: tm.rand(2, device="gpu"),
    lambda: tm.tensor([1.0]).to("gpu"),
])
def test_bad_device_in_constructors_and_to(make):
    with pytest.raises(ValueError, match="'gpu'"):
        make()


def test_to_same_device_is_identity_and_cpu_spellings_work():
    t = tm.tensor([1.0, 2.0], requires_grad=True)
    assert t.to("cpu") is t
    assert t.to("CPU") is t


@CUDA_ONLY
@pytest.mark.cuda
def test_to_cuda_and_back_round_trips_values_and_requires_grad():
    t = tm.tensor([[1.0, -2.0], [3.5, 4.0]], requires_grad=True, dtype="float64")
    on_gpu = t.to("cuda")
    assert on_gpu.device == "cuda" and on_gpu.dtype == np.float64 and on_gpu.requires_grad
    back = on_gpu.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray)
    np.testing.assert_array_equal(back.numpy(), t.numpy())


# ----- dtypes ----------------------------------------------------------------------------------------------
def test_default_dtype_is_float32_for_python_data():
    assert tm.tensor([1, 2, 3]).dtype == np.float32
    assert tm.tensor([1.5, 2.5]).dtype == np.float32
    assert tm.tensor(3.0).dtype == np.float32
    assert tm.zeros(2).dtype == np.float32
    assert tm.ones(2).dtype == np.float32
    assert tm.randn(2, generator=0).dtype == np.float32
    assert tm.rand(2, generator=0).dtype == np.float32


def test_floating_arrays_keep_their_dtype_and_dtype_argument_wins():
    assert tm.tensor(np.ones(2, dtype=np.float64)).dtype == np.float64
    assert tm.tensor(np.ones(2, dtype=np.float32)).dtype == np.float32
    assert tm.tensor(np.ones(2, dtype=np.float32), dtype="float64").dtype == np.float64
    assert tm.tensor([1.0], dtype=np.float64).dtype == np.float64
    assert tm.tensor(tm.tensor([1.0], dtype="float64")).dtype == np.float64


@pytest.mark.parametrize("make", [
    lambda: tm.tensor([1.0, 2.0], dtype="float16"),
    lambda: tm.tensor(np.ones(2, dtype=np.float16)),
    lambda: tm.zeros(2, dtype="float16"),
    lambda: tm.ones(2, dtype=np.float16),
    lambda: tm.randn(2, dtype="float16", generator=0),
    lambda: tm.rand(2, dtype="float16", generator=0),
    lambda: tm.tensor([1.0]).astype("float16"),
])
def test_float16_is_refused_on_cpu(make):
    with pytest.raises((TypeError, ValueError)) as info:
        make()
    message = str(info.value)
    assert "float16" in message and "cuda" in message


@CUDA_ONLY
@pytest.mark.cuda
def test_float16_is_allowed_on_cuda():
    t = tm.tensor([1.0, 2.0], dtype="float16", device="cuda")
    assert t.dtype == np.float16 and t.device == "cuda"
    assert tm.zeros(3, dtype="float16", device="cuda").dtype == np.float16


@pytest.mark.parametrize("integer_dtype", ["int64", "int32", np.int8, "uint8", int, bool, "bool", "complex64"])
def test_non_float_dtypes_are_refused_naming_the_argument(integer_dtype):
    with pytest.raises(TypeError) as info:
        tm.tensor([1, 2], dtype=integer_dtype)
    message = str(info.value)
    assert "dtype=" in message and np.dtype(integer_dtype).name in message
    assert "float32" in message  # says what is expected


@pytest.mark.parametrize("make", [
    lambda: tm.zeros(2, dtype="int64"),
    lambda: tm.ones(2, dtype="int32"),
    lambda: tm.randn(2, dtype="int64", generator=0),
    lambda: tm.tensor([1.0]).astype("int64"),
])
def test_integer_dtype_refused_by_constructors_and_astype(make):
    with pytest.raises(TypeError, match="int"):
        make()


def test_nonsense_dtype_is_refused_naming_it():
    with pytest.raises(TypeError, match="not_a_dtype"):
        tm.tensor([1.0], dtype="not_a_dtype")


def test_unconvertible_data_is_a_type_error():
    with pytest.raises(TypeError, match="tensor"):
        tm.tensor("hello")
    with pytest.raises(TypeError):
        tm.tensor([[1.0, 2.0], [3.0]])  # ragged


# ----- constructors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zeros_and_ones(device, dtype):
    z = tm.zeros(2, 3, dtype=dtype, device=device)
    o = tm.ones((2, 3), dtype=dtype, device=device)
    assert z.shape == (2, 3) and o.shape == (2, 3)
    assert z.dtype == np.dtype(dtype) and o.dtype == np.dtype(dtype)
    assert z.device == device and o.device == device
    np.testing.assert_array_equal(z.numpy(), np.zeros((2, 3)))
    np.testing.assert_array_equal(o.numpy(), np.ones((2, 3)))
    assert not z.requires_grad and z.grad is None
    assert tm.ones(4, requires_grad=True).requires_grad
    assert tm.zeros().shape == ()
    assert tm.zeros([0, 2]).shape == (0, 2)


@pytest.mark.parametrize("bad_shape", [(-1,), (2.5,), ("3",)])
def test_constructor_rejects_bad_sizes_naming_shape(bad_shape):
    with pytest.raises(ValueError, match="shape"):
        tm.zeros(*bad_shape)


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_same_int_seed_same_numbers_different_seed_different(make):
    a = make(5, 7, generator=123)
    b = make(5, 7, generator=123)
    c = make(5, 7, generator=124)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_generator_object_is_used_and_advanced(make):
    first = make(4, generator=np.random.default_rng(7))
    again = make(4, generator=np.random.default_rng(7))
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    shared = np.random.default_rng(7)
    one, two = make(4, generator=shared), make(4, generator=shared)
    np.testing.assert_array_equal(one.numpy(), first.numpy())
    assert not np.array_equal(one.numpy(), two.numpy())  # the generator's state moved on
    # an int seed means the same stream as a Generator seeded with it
    np.testing.assert_array_equal(make(4, generator=7).numpy(), first.numpy())


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_unseeded_draws_differ(make):
    assert not np.array_equal(make(16).numpy(), make(16).numpy())


@pytest.mark.parametrize("make", [tm.randn, tm.rand])
def test_seed_gives_same_values_across_dtypes(make):
    as32 = make(50, generator=3, dtype="float32").numpy()
    as64 = make(50, generator=3, dtype="float64").numpy()
    assert as64.dtype == np.float64
    np.testing.assert_allclose(as32, as64, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [-1, "seed", 1.5])
def test_bad_generator_is_refused_naming_it(bad):
    with pytest.raises(TypeError, match="generator"):
        tm.randn(3, generator=bad)


def test_randn_is_standard_normal():
    samples = tm.randn(200_000, generator=0, dtype="float64").numpy()
    assert abs(samples.mean()) < 0.01
    assert abs(samples.std() - 1.0) < 0.01
    assert samples.min() < -3.5 and samples.max() > 3.5  # tails, not a bounded distribution


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rand_is_uniform_on_zero_one(dtype):
    samples = tm.rand(200_000, generator=1, dtype=dtype).numpy()
    assert samples.dtype == np.dtype(dtype)
    assert samples.min() >= 0.0 and samples.max() < 1.0
    assert abs(samples.mean() - 0.5) < 0.01
    counts, _ = np.histogram(samples, bins=10, range=(0.0, 1.0))
    assert counts.min() > 0.9 * len(samples) / 10


def test_rand_float32_never_returns_one():
    # With seed 24 one of these 10**6 float64 draws lies within 2**-25 of 1 and rounds to 1.0f.
    samples = tm.rand(10**6, generator=24, dtype="float32").numpy()
    assert samples.max() < 1.0


@pytest.mark.parametrize("make", [tm.zeros, tm.ones, tm.randn, tm.rand])
def test_constructors_place_tensors_on_device(device, make):
    t = make(3, 2, device=device, dtype="float64")
    assert t.device == device and t.shape == (3, 2) and t.dtype == np.float64


# ----- matmul precision -----------------------------------------------------------------------------------
@pytest.fixture
def restore_matmul_precision():
    before = tm.get_matmul_precision()
    yield
    tm.set_matmul_precision(before)


def test_matmul_precision_rejects_unknown_values_by_name(restore_matmul_precision):
    tm.set_matmul_precision("tf32")
    with pytest.raises(ValueError, match="precision='fast'.*highest.*tf32"):
        tm.set_matmul_precision("fast")
    assert tm.get_matmul_precision() == "tf32"  # unchanged by the refused call


class _LinalgStub:
    """Stands in for cupy._core._routines_linalg: records the compute type set per dtype."""
    COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_TF32 = 1, 7

    def __init__(self):
        self.calls = []

    def set_compute_type(self, dtype, compute_type):
        self.calls.append((np.dtype(dtype), compute_type))


@pytest.mark.parametrize("precision, expected", [("tf32", 7), ("highest", 1)])
def test_matmul_precision_sets_cupys_float32_compute_type(restore_matmul_precision, precision, expected):
    stub = _LinalgStub()
    tm.set_matmul_precision(precision)
    backend._apply_matmul_precision(stub)
    assert stub.calls == [(np.dtype(np.float32), expected)]


def test_tf32_on_a_cupy_without_the_compute_type_switch_says_what_to_do(restore_matmul_precision):
    tm.set_matmul_precision("highest")
    backend._apply_matmul_precision(None)  # full float32 is CuPy's own default: nothing to do
    tm.set_matmul_precision("tf32")
    with pytest.raises(tm.BackendUnavailableError, match="CUPY_TF32"):
        backend._apply_matmul_precision(None)


@CUDA_ONLY
def test_tf32_rounds_float32_cuda_matmuls_and_highest_does_not(restore_matmul_precision):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512)).astype(np.float32) for _ in range(2))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    errors = {}
    for precision in ("tf32", "highest"):
        tm.set_matmul_precision(precision)
        product = (tm.tensor(a, device="cuda") @ tm.tensor(b, device="cuda")).numpy()
        assert product.dtype == np.float32
        errors[precision] = np.abs(product - exact).max() / np.abs(exact).max()
    assert errors["highest"] < 1e-5 < errors["tf32"], errors
