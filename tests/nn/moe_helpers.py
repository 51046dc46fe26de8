"""Building MoE layers for the tests: seeded layers with randomised parameters of non-trivial scale."""
import contextlib

import numpy as np

import tinymoe as tm
from tinymoe.engine.backend import to_device
from tinymoe.nn import MoE

# Scales of the randomised parameters: a router decisive enough that top-k gaps dwarf gradcheck's eps,
# experts large enough that every path carries a visible gradient.
SCALES = {"router.weight": 1.5, "router.noise_weight": 0.7}
DEFAULT_SCALE = 0.6


def set_parameter(parameter, values):
    """Overwrite a Parameter's data (keeping its dtype and device)."""
    parameter.data = to_device(np.ascontiguousarray(values, dtype=parameter.dtype), parameter.device)
    parameter.grad = None


def randomize(moe, seed=0, scales=None):
    """Give every parameter N(0, scale²) values (and the sigmoid router a random selection bias)."""
    rng = np.random.default_rng(seed)
    scales = {**SCALES, **(scales or {})}
    for name, parameter in moe.named_parameters():
        set_parameter(parameter, scales.get(name, DEFAULT_SCALE) * rng.standard_normal(parameter.shape))
    return moe


def layer(d_model=6, d_ff=5, n_experts=4, top_k=2, dtype="float64", device="cpu", seed=0, randomized=True, **options):
    moe = MoE(d_model, d_ff, n_experts, top_k=top_k, dtype=dtype, device=device, seed=seed, **options)
    return randomize(moe, seed) if randomized else moe


def inputs(shape, seed=1, dtype="float64", device="cpu", requires_grad=True, scale=1.0):
    values = scale * np.random.default_rng(seed).standard_normal(shape)
    return tm.tensor(values, requires_grad=requires_grad, dtype=dtype, device=device)


def fast_kernels(device):
    """The NumPy reference kernels on the CPU (Numba's parallel launch costs milliseconds per call on tiny
    arrays, which thousands of gradcheck forwards would feel); the default kernels elsewhere."""
    return tm.kernels.use("numpy") if device == "cpu" else contextlib.nullcontext()
