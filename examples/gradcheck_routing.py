"""Checking hand-written gradients with tm.gradcheck and tm.testing.assert_gradients, routing flips included.

Every op in tinymoe has a backward written by hand, and every one is checked against central differences
in float64:  numeric = (L(x + eps·u) − L(x − eps·u)) / (2·eps)  vs  analytic = <dL/dx, u>,  L = <v, fn(x)>.
Four short stories:
    1. a custom op with a right backward passes;
    2. a wrong backward is caught, and the report says where;
    3. an MoE layer with a near-tie: a ±eps nudge flips a token's expert, the difference quotient measures a
       jump, a plain check fails; `discrete=tm.testing.moe_decisions(moe)` leaves those nudges out and lists them;
    4. a huge output (a z-loss of 1e6) blurs the difference quotient by round-off; the tolerance scales with it.

    python examples/gradcheck_routing.py      # ~1 s, prints only
"""
import numpy as np

import tinymoe as tm
from tinymoe.testing import assert_gradients, moe_decisions


# 1. A custom op: softplus(x) = log(1 + e^x), whose derivative is sigmoid(x). Forward and backward side by side.
class Softplus(tm.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return np.logaddexp(0.0, x)

    @staticmethod
    def backward(ctx, grad):          # dx = sigmoid(x) · g
        (x,) = ctx.saved_tensors
        return grad / (1.0 + np.exp(-x))


x = tm.tensor(np.random.default_rng(0).standard_normal((3, 4)), dtype="float64", requires_grad=True)
report = assert_gradients(Softplus.apply, [x])     # 12 elements: checked one by one
print(f"1. softplus, right backward: {report.summary()}")


# 2. The same op with a classic slip: e^x / (1 + e^x)² (that is sigmoid'(x)) instead of sigmoid(x).
class WrongSoftplus(Softplus):
    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * np.exp(x) / (1.0 + np.exp(x)) ** 2


try:
    assert_gradients(WrongSoftplus.apply, [x])
except tm.GradcheckError as error:                 # an AssertionError: pytest prints the whole report
    print(f"2. softplus, wrong backward: caught, {len(error.report.mismatches)} of "
          f"{error.report.checked[0]} comparisons failed; worst:\n   {error.report.summary()}")

# 3. An MoE layer (top-1, 4 experts, dropless) whose token 0 sits 1e-7 from a tie between experts 2 and 0.
#    With eps = 1e-6 a nudge of that token's input or of the router weight swaps its expert.
d_model, n_experts, n_tokens, gap = 4, 4, 6, 1e-7
moe = tm.nn.MoE(d_model=d_model, d_ff=8, n_experts=n_experts, top_k=1, dtype="float64", seed=0)
rng = np.random.default_rng(3)
for parameter in moe.parameters():
    parameter.data = rng.standard_normal(parameter.shape)
tokens = rng.standard_normal((n_tokens, d_model))
tokens[0] = np.linalg.solve(moe.router.weight.data, [1.0 - gap, -0.4, 1.0, -1.0])  # logits of token 0
logits = tokens @ moe.router.weight.data.T
print(f"3. MoE near-tie: token 0's top two logits differ by {np.diff(np.sort(logits[0])[-2:])[0]:.1e}, "
      f"the next-closest token's by {min(np.diff(np.sort(row)[-2:])[0] for row in logits[1:]):.2f}")
x = tm.tensor(tokens, dtype="float64", requires_grad=True)
names, parameters = zip(*moe.named_parameters())
inputs, input_names = [x, *parameters], ["x", *names]


def moe_outputs(x, *parameters):          # the parameters are inputs too: they are perturbed in place
    return moe(x), moe.aux_loss


plain = tm.gradcheck(moe_outputs, inputs, raise_exception=False, return_report=True)
worst = plain.worst(1)[0]
print(f"   plain check: passed={plain.passed}, {len(plain.mismatches)} failures; worst: {input_names[worst.input]} "
      f"{worst.where}: analytic {worst.analytic:.3g} vs numeric {worst.numeric:.3g} (a jump over 2·eps)")
report = assert_gradients(moe_outputs, inputs, discrete=moe_decisions(moe))
flips = {input_names[p]: len(report.excluded_of(p)) for p in range(len(inputs)) if report.excluded_of(p)}
print(f"   with discrete=moe_decisions(moe): passed={report.passed}, excluded {len(report.excluded)} "
      f"perturbations that flipped the routing {flips}, e.g. {report.excluded[0].describe()}")
print(f"   {report.summary()}")

# 4. Tolerance for a large output: 1.3e6 + 0.01·softplus(x). The constant's derivative is 0, but each
#    evaluation of the output rounds at ulp(1.3e6) ≈ 2e-10, and dividing by 2·eps = 2e-6 blurs the numeric
#    derivative by ~1e-4, ten times the fixed atol of 1e-5.
def z_loss_sized(t):
    return 0.01 * Softplus.apply(t) + 1.3e6


x = tm.tensor(np.random.default_rng(1).standard_normal((2, 3)), dtype="float64", requires_grad=True)
fixed = tm.gradcheck(z_loss_sized, [x], roundoff=0.0, raise_exception=False, return_report=True)
scaled = tm.gradcheck(z_loss_sized, [x], return_report=True)
print(f"4. huge output, fixed atol (roundoff=0): passed={fixed.passed}, worst |diff| "
      f"{fixed.worst(1)[0].abs_error:.1e} > atol {fixed.atol:g}: round-off, not a wrong gradient")
print(f"   scaled tolerance atol + 4·eps64·Σ|v·out|/eps = {scaled.tolerances[0]:.1e}: passed={scaled.passed}")
try:
    tm.gradcheck(lambda t: 0.01 * WrongSoftplus.apply(t) + 1.3e6, [x])
except tm.GradcheckError:
    print("   and the wrong backward under the same huge output is still caught")
