"""Shared fixtures and the skip summary.

`device` runs a test on "cpu" always and on "cuda" where CuPy sees a GPU (shown as skipped elsewhere, never
silently dropped). Skips are summarised as one line per reason with its count. CI sets
TINYMOE_REQUIRE_ORACLES=1 after installing torch and transformers (and TINYMOE_REQUIRE_MPI=1 with mpi4py):
then a test skipped for want of one of them fails instead, so the oracle tests cannot silently stop running.
"""
import collections
import os

import pytest

from tinymoe.engine.backend import cuda_available

os.environ.setdefault("MPLBACKEND", "Agg")

CUDA = pytest.param(
    "cuda",
    id="cuda",
    marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")],
)
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]

_REQUIRED = {
    "TINYMOE_REQUIRE_ORACLES": ("torch", "transformers"),
    "TINYMOE_REQUIRE_MPI": ("mpi4py", "mpiexec"),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    for variable, packages in _REQUIRED.items():
        if os.environ.get(variable) and any(package in reason for package in packages):
            report.outcome = "failed"
            report.longrepr = f"{variable} is set, but this test was skipped: {reason}"


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    counts = collections.Counter(_skip_reason(report) for report in skipped)
    terminalreporter.section(f"skipped: {len(skipped)} tests, by reason")
    for reason, count in counts.most_common():
        terminalreporter.line(f"{count:5d}  {reason}")
