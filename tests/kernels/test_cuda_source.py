"""The CUDA kernels' source without a GPU: it ships as package data (tinymoe/kernels/cuda/*.cu), is read with
importlib.resources, compiles for each dtype (with nvcc where it is installed) and defines every kernel that
tinymoe.kernels.cuda launches; importing that module does not import CuPy."""
import re
import shutil
import subprocess
import sys

import pytest

from tinymoe.kernels import cuda

LAUNCHED = ("gather_rows", "combine_rows", "combine_weights_grad", "sum_segments", "swiglu", "swiglu_backward")
ENTRIES = {f"{name}_{kind}" for name in LAUNCHED for kind in ("vec", "scalar")}
NVCC = shutil.which("nvcc")


def test_source_is_package_data_with_one_define_per_dtype():
    for dtype in ("float32", "float64", "float16"):
        macro = f"TINYMOE_{dtype.upper()}"
        text = cuda.source(dtype)
        assert text.startswith(f"#define {macro}\n")
        assert "__global__" in text and "cuda.py" in text
    with pytest.raises(TypeError, match="float16, float32 or float64 data, got int32"):
        cuda.source("int32")


def test_every_launched_kernel_is_defined_in_the_source():
    launched = set(re.findall(r'"(\w+)_vec" if', open(cuda.__file__, encoding="utf-8").read()))
    launched |= set(re.findall(r'_launch_\w+\("(\w+)"', open(cuda.__file__, encoding="utf-8").read()))
    assert launched == set(LAUNCHED)
    defined = set(re.findall(r"^ENTRY\((\w+),", cuda.source("float32"), flags=re.MULTILINE))
    assert defined == set(LAUNCHED)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_source_compiles_for_each_dtype(tmp_path, dtype):
    source = tmp_path / f"dispatch_{dtype}.cu"
    source.write_text(cuda.source(dtype), encoding="utf-8")
    ptx = tmp_path / f"dispatch_{dtype}.ptx"
    result = subprocess.run([NVCC, "--ptx", "-o", str(ptx), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    entries = set(re.findall(r"^\.visible \.entry (\w+)\(", ptx.read_text(), flags=re.MULTILINE))
    assert entries == ENTRIES


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_source_without_a_dtype_define_is_a_clear_compile_error(tmp_path):
    source = tmp_path / "no_dtype.cu"
    source.write_text(cuda.source("float32").split("\n", 1)[1], encoding="utf-8")
    result = subprocess.run([NVCC, "--ptx", "-o", str(tmp_path / "x.ptx"), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "define TINYMOE_FLOAT32" in result.stderr


def test_importing_the_cuda_module_does_not_import_cupy():
    code = "import sys, tinymoe.kernels.cuda as c; c.source('float16'); print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
