"""`tinymoe info`: versions, devices, and which kernel implementations are available and chosen."""
from __future__ import annotations

import importlib
import platform



def add_parser(commands) -> None:
    parser = commands.add_parser("info", help="versions, devices and kernels", description=__doc__)
    parser.set_defaults(run=run_info)


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except ImportError:
        return "not installed"


def run_info(args) -> int:
    from .. import __version__, kernels
    from ..engine.backend import BackendUnavailableError, import_cupy

    rows = [("tinymoe", __version__), ("python", platform.python_version()), ("numpy", _version("numpy")),
            ("numba", _version("numba")), ("cupy", _version("cupy")), ("matplotlib", _version("matplotlib")),
            ("safetensors", _version("safetensors"))]
    try:
        cupy = import_cupy()
        properties = cupy.cuda.runtime.getDeviceProperties(0)
        name = properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"]
        cuda = f"{name} ({cupy.cuda.runtime.getDeviceCount()} device(s))"
    except BackendUnavailableError as error:
        cuda = f"unavailable: {error}"
    rows += [("cpu", f"{platform.machine()}, {platform.processor() or platform.system()}"), ("cuda", cuda)]
    problem = kernels.environment_problem()
    for device in ("cpu", "cuda"):
        available = kernels.available(device) if device == "cpu" or not cuda.startswith("unavailable") else []
        if available:
            chosen = "none: TINYMOE_KERNELS is invalid" if problem else kernels.chosen(device)
            rows.append((f"kernels ({device})", f"available {', '.join(available)}; chosen {chosen}"))
    rows.append(("kernel choice", f"problem: {problem}" if problem else
                 f"{kernels.current()} (TINYMOE_KERNELS or tinymoe.kernels.use)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
