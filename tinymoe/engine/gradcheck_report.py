"""What `gradcheck` found: every failing comparison, the tolerance each output was held to, and the
perturbations left out because they flipped a discrete decision. `GradcheckError` carries it as `.report`.

    report.passed            bool
    report.mismatches        [Mismatch]  failing comparisons, worst first (largest excess over tolerance)
    report.excluded          [Exclusion] perturbations whose ±eps flipped the `discrete` state (not compared)
    report.tolerances        {output: atol_effective}  atol + c·eps64·Σ|v ⊙ out| / eps (see gradcheck.py)
    report.checked           {input: comparisons made}  (per output, so elements × outputs)
    report.format(worst=5)   the readable multi-line text of GradcheckError
"""
from __future__ import annotations

from dataclasses import dataclass, field


def location(kind: str, where) -> str:
    """'element (1, 2)' or 'random direction 3'."""
    return f"element {tuple(int(i) for i in where)}" if kind == "element" else f"random direction {where}"


@dataclass(frozen=True)
class Mismatch:
    """One comparison of <dL_o/dx, u> with (L_o(x + eps·u) − L_o(x − eps·u)) / (2·eps) that failed."""

    input: int                 # position of the input in `inputs`
    output: int                # which output of fn (L_o = <v_o, out_o>)
    kind: str                  # "element" (u = unit vector at `where`) or "direction" (u random Gaussian)
    where: tuple | int         # multi-index of the element, or the number of the random direction
    analytic: float
    numeric: float
    tolerance: float           # atol_effective(output) + rtol·|numeric|
    missing_gradient: bool = False  # backward returned no gradient for this input (for this output)

    @property
    def abs_error(self) -> float:
        return abs(self.analytic - self.numeric)

    @property
    def rel_error(self) -> float:
        scale = max(abs(self.analytic), abs(self.numeric))
        return self.abs_error / scale if scale > 0 else 0.0

    @property
    def excess(self) -> float:
        return self.abs_error - self.tolerance

    def describe(self, shape=None) -> str:
        of_shape = f" of shape {tuple(shape)}" if shape is not None else ""
        missing = " (backward gave no gradient for it)" if self.missing_gradient else ""
        return (f"input {self.input}{of_shape}{missing}, output {self.output}, {location(self.kind, self.where)}: "
                f"analytic {self.analytic:.6g} vs numeric {self.numeric:.6g} "
                f"(|diff| {self.abs_error:.3g} > {self.tolerance:.3g}, relative {self.rel_error:.3g})")


@dataclass(frozen=True)
class Exclusion:
    """A perturbation not compared: the discrete state at x + eps·u and/or x − eps·u differs from that at x."""

    input: int
    kind: str                  # "element" or "direction"
    where: tuple | int
    sides: str                 # "+", "-" or "+-": which of the two steps flipped the state

    def describe(self) -> str:
        return f"input {self.input} {location(self.kind, self.where)} (flipped at {self.sides}eps)"


@dataclass
class GradcheckReport:
    """The outcome of one gradcheck. Truthy when it passed."""

    eps: float
    atol: float
    rtol: float
    roundoff: float
    input_shapes: dict                                  # {input position: shape} of the checked inputs
    tolerances: dict = field(default_factory=dict)      # {output: atol_effective}
    checked: dict = field(default_factory=dict)         # {input: comparisons made}
    perturbations: dict = field(default_factory=dict)   # {input: perturbations tried (elements or directions)}
    mismatches: list = field(default_factory=list)
    excluded: list = field(default_factory=list)
    problems: list = field(default_factory=list)        # failures that are not a single comparison

    @property
    def passed(self) -> bool:
        return not self.mismatches and not self.problems

    def __bool__(self) -> bool:
        return self.passed

    def worst(self, count: int = 5) -> list:
        """The `count` failing comparisons with the largest excess over their tolerance."""
        return sorted(self.mismatches, key=lambda m: m.excess, reverse=True)[:count]

    def excluded_of(self, position: int) -> list:
        return [exclusion for exclusion in self.excluded if exclusion.input == position]

    def summary(self) -> str:
        """One line: the worst mismatch, or what passed."""
        if self.problems:
            return self.problems[0]
        if self.mismatches:
            worst = self.worst(1)[0]
            return worst.describe(self.input_shapes.get(worst.input))
        excluded = f", {len(self.excluded)} perturbations excluded (decision flipped)" if self.excluded else ""
        return f"passed: {sum(self.checked.values())} comparisons{excluded}"

    def format(self, worst: int = 5) -> str:
        """The multi-line text of GradcheckError (also readable for a report that passed)."""
        head = "gradcheck failed" if not self.passed else "gradcheck passed"
        lines = [f"{head} (eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g}, "
                 f"round-off factor {self.roundoff:g})"]
        lines += [f"  {problem}" for problem in self.problems]
        if self.mismatches:
            failing_inputs = sorted({m.input for m in self.mismatches})
            lines.append(f"  {len(self.mismatches)} comparison(s) failed, in input(s) "
                         f"{', '.join(str(i) for i in failing_inputs)}; worst {min(worst, len(self.mismatches))}:")
            lines += [f"    {m.describe(self.input_shapes.get(m.input))}" for m in self.worst(worst)]
        if self.tolerances:
            lines.append("  atol_effective per output (atol + c·eps64·Σ|v·out|/eps): "
                         + ", ".join(f"output {o}: {t:.3g}" for o, t in sorted(self.tolerances.items())))
        if self.excluded:
            lines.append(f"  excluded, not compared ({len(self.excluded)} perturbation(s) flipped the discrete state):")
            for position in sorted({e.input for e in self.excluded}):
                ours = self.excluded_of(position)
                shown = "; ".join(e.describe() for e in ours[:worst])
                more = f"; and {len(ours) - worst} more" if len(ours) > worst else ""
                lines.append(f"    {len(ours)} of {self.perturbations.get(position, '?')} for input {position}: "
                             f"{shown}{more}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


class GradcheckError(AssertionError):
    """A hand-written gradient disagrees with finite differences (or is missing). `.report`: GradcheckReport
    (None for a failure found before any comparison, e.g. a non-deterministic fn)."""

    def __init__(self, message, report: GradcheckReport | None = None):
        super().__init__(message)
        self.report = report
