"""`gradcheck`: hand-written gradients against central finite differences, in float64.

For a random cotangent v of fn's output, L(x) = <v, fn(x)> and the hand-written backward gives dL/dx.
Each input is checked along directions u:

    numeric  = (L(x + eps·u) − L(x − eps·u)) / (2·eps)        analytic = <dL/dx, u>
    pass when |numeric − analytic| <= atol + rtol·|numeric|

Inputs with at most `exact_max_elements` elements are checked element by element (u = every unit vector);
larger ones along `n_directions` random Gaussian directions (the forward-mode check of HIPS autograd),
which stays cheap at any size. Inputs are perturbed in place, so `fn` may also read them from a closure
(e.g. a module's parameters passed in `inputs`).
"""
from __future__ import annotations

import numpy as np

from .autograd import no_grad
from .backend import to_numpy
from .tensor import Tensor


class GradcheckError(AssertionError):
    """A hand-written gradient disagrees with finite differences (or is missing)."""


def gradcheck(
    fn,
    inputs,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    raise_exception: bool = True,
    *,
    n_directions: int = 4,
    exact_max_elements: int = 64,
    seed: int = 0,
) -> bool:
    """Compare the gradients of `fn(*inputs)` with central differences for every input with requires_grad.

    fn: callable of `inputs` returning a float64 Tensor (or a tuple of them). inputs: Tensors (and any other
    arguments, passed through). Returns True; on a mismatch raises GradcheckError naming the input and the
    worst mismatch, or returns False when `raise_exception=False`. `fn` must be deterministic: seed any noise.
    """
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    checked = [i for i, value in enumerate(inputs) if isinstance(value, Tensor) and value.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to check")
    for position in checked:
        if inputs[position].dtype != np.float64:
            raise TypeError(
                f"gradcheck: input {position} is {inputs[position].dtype.name}; finite differences need float64 inputs"
            )
    if not eps > 0:
        raise ValueError(f"gradcheck: eps={eps!r} must be positive")
    rng = np.random.default_rng(seed)
    saved_grads = [inputs[position].grad for position in checked]
    saved_retain = [inputs[position]._retains_grad for position in checked]

    try:
        for position in checked:
            inputs[position].grad = None
            inputs[position]._retains_grad = True  # non-leaf inputs get .grad too
        outputs = _outputs_of(fn(*inputs))
        cotangents = [out.xp.asarray(rng.standard_normal(out.shape)) for out in outputs]
        for out, cotangent in zip(outputs, cotangents):
            if out.requires_grad:
                out.backward(cotangent, retain_graph=True)
        analytic = {position: inputs[position].grad for position in checked}
        base_value = _contract(outputs, cotangents)

        def value_at_current_inputs() -> float:
            with no_grad():
                return _contract(_outputs_of(fn(*inputs)), cotangents)

        repeat_value = value_at_current_inputs()
        if abs(repeat_value - base_value) > atol + rtol * abs(base_value):
            raise GradcheckError(
                f"gradcheck: fn is not deterministic (two calls gave {base_value!r} and {repeat_value!r}); "
                "fix the seed of any noise, dropout or jitter inside fn"
            )

        failures = []
        for position in checked:
            failure = _check_input(inputs[position], position, analytic[position], value_at_current_inputs,
                                   eps, atol, rtol, n_directions, exact_max_elements, rng)
            if failure:
                failures.append(failure)
    finally:
        for position, grad, retain in zip(checked, saved_grads, saved_retain):
            inputs[position].grad, inputs[position]._retains_grad = grad, retain

    if failures:
        if raise_exception:
            raise GradcheckError("gradcheck failed:\n  " + "\n  ".join(failures))
        return False
    return True


def _outputs_of(result):
    outputs = result if isinstance(result, (tuple, list)) else (result,)
    for out in outputs:
        if not isinstance(out, Tensor):
            raise TypeError(f"gradcheck: fn must return Tensors, got {type(out).__name__}")
        if out.dtype != np.float64:
            raise TypeError(f"gradcheck: fn returned a {out.dtype.name} tensor; compute in float64")
    return tuple(outputs)


def _contract(outputs, cotangents) -> float:
    return float(sum(float((out.data * cotangent).sum()) for out, cotangent in zip(outputs, cotangents)))


def _check_input(tensor, position, grad, value_at, eps, atol, rtol, n_directions, exact_max_elements, rng):
    """Return a one-line description of the worst mismatch for this input, or None when it passes."""
    xp = tensor.xp
    original = tensor.data
    grad_host = np.zeros(tensor.shape) if grad is None else np.asarray(to_numpy(grad), dtype=np.float64)
    if tensor.size <= exact_max_elements:
        directions = (("element", np.unravel_index(flat, tensor.shape)) for flat in range(tensor.size))
    else:
        directions = (("random direction", number) for number in range(n_directions))

    worst = None  # (excess over tolerance, description)
    for kind, label in directions:
        if kind == "element":
            direction = np.zeros(tensor.shape)
            direction[label] = 1.0
        else:
            direction = rng.standard_normal(tensor.shape)
        step = xp.asarray(direction * eps)
        try:
            tensor.data = original + step
            value_plus = value_at()
            tensor.data = original - step
            value_minus = value_at()
        finally:
            tensor.data = original
        numeric = (value_plus - value_minus) / (2 * eps)
        analytic = float((grad_host * direction).sum())
        error, tolerance = abs(numeric - analytic), atol + rtol * abs(numeric)
        if error > tolerance and (worst is None or error - tolerance > worst[0]):
            where = f"element {tuple(int(i) for i in label)}" if kind == "element" else f"random direction {label}"
            worst = (error - tolerance,
                     f"{where}: analytic {analytic:.6g} vs numeric {numeric:.6g} (|diff| {error:.3g} > {tolerance:.3g})")
    if worst is None:
        return None
    missing = " (backward gave no gradient for it)" if grad is None else ""
    return f"input {position} of shape {tensor.shape}{missing}: worst at {worst[1]}"
