"""Every mistake a user can make gives exactly one line on stderr starting with "tinymoe", no traceback, and a
non-zero exit status (2 for argument errors)."""
import shutil
import zipfile

import numpy as np
import pytest

from cli_helpers import NO_GPU, TEXT, TINY, assert_ok, assert_one_line_error, tinymoe


# ----- user errors: one line, no traceback -------------------------------------------------------------------
def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


TRAIN_ERRORS = {
    "missing data": (lambda d: ["--data", d / "missing.txt"], "missing.txt"),
    "empty data": (lambda d: ["--data", _write(d / "empty.txt", "")], "empty"),
    "binary data": (lambda d: ["--data", _write(d / "data.bin", bytes(range(256)) * 8)], "binary"),
    "not utf-8": (lambda d: ["--data", _write(d / "latin1.txt", ("caf\xe9 " * 200).encode("latin-1"))], "UTF-8"),
    "too short": (lambda d: ["--data", _write(d / "short.txt", "tiny text")], "short"),
    "data is a directory": (lambda d: ["--data", d], "--data"),
    "cuda without cupy": pytest.param(lambda d: ["--data", d / "data.txt", "--device", "cuda"], "cuda", marks=NO_GPU),
    "out under a file": (lambda d: ["--data", d / "data.txt", "--out", _write(d / "plain", "x") / "run"], "--out"),
    "out is a file": (lambda d: ["--data", d / "data.txt", "--out", _write(d / "plain2", "x")], "--out"),
    "heads do not divide": (lambda d: ["--data", d / "data.txt", "--heads", "3"], "n_heads"),
    "top-k above experts": (lambda d: ["--data", d / "data.txt", "--top-k", "5"], "top_k"),
    "moe layer out of range": (lambda d: ["--data", d / "data.txt", "--moe-layers", "3"], "moe_layers"),
    "moe layers not integers": (lambda d: ["--data", d / "data.txt", "--moe-layers", "first"], "--moe-layers"),
    "bias rate without sigmoid": (lambda d: ["--data", d / "data.txt", "--bias-update-rate", "0.1"], "bias_update_rate"),
    "resume without checkpoint": (lambda d: ["--data", d / "data.txt", "--out", d / "fresh", "--resume"], "checkpoint"),
}


@pytest.mark.parametrize("make_args, fragment", TRAIN_ERRORS.values(), ids=TRAIN_ERRORS.keys())
def test_train_user_errors_are_one_line(workdir, tmp_path, make_args, fragment):
    shutil.copy(workdir / "data.txt", tmp_path / "data.txt")
    args = ["train", "--steps", "2", "--out", tmp_path / "run", *TINY, *make_args(tmp_path)]
    result = tinymoe(*args, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert "step 1/" not in result.stdout  # nothing trained


def test_resume_with_another_config_is_one_line(trained, tmp_path):
    out, _ = trained
    shutil.copytree(out, tmp_path / "run")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = tinymoe("train", "--data", "data.txt", "--steps", "6", "--out", "run", *TINY, "--d-model", "32",
                     "--resume", cwd=tmp_path)
    assert_one_line_error(result, "d_model")


ARGPARSE_ERRORS = {
    "steps 0": ["train", "--steps", "0"],
    "steps not a number": ["train", "--steps", "many"],
    "unknown matmul precision": ["train", "--matmul-precision", "fast"],
    "sample length 0": ["sample", "--checkpoint", "run", "--length", "0"],
    "sample temperature -1": ["sample", "--checkpoint", "run", "--temperature", "-1"],
    "sample seed -1": ["sample", "--seed", "-1"],
    "lr inf": ["train", "--lr", "inf"],
    "lr 1e30": ["train", "--lr", "1e30"],
    "lr nan": ["train", "--lr", "nan"],
    "lr 0": ["train", "--lr", "0"],
    "warmup -1": ["train", "--warmup", "-1"],
    "dropout 1": ["train", "--dropout", "1"],
    "seed -1": ["train", "--seed", "-1"],
    "weight decay inf": ["train", "--weight-decay", "inf"],
    "checkpoint every -1": ["train", "--checkpoint-every", "-1"],
    "resume and overwrite": ["train", "--resume", "--overwrite"],
    "abbreviated flag": ["train", "--res"],  # exact names only: the printed resume command is built from them
}


@pytest.mark.parametrize("args", ARGPARSE_ERRORS.values(), ids=ARGPARSE_ERRORS.keys())
def test_argument_errors_are_one_line(tmp_path, args):
    result = tinymoe(*args, cwd=tmp_path)
    assert_one_line_error(result)
    assert result.returncode == 2
    flag = [arg for arg in args if arg.startswith("--")][-1]
    if flag != "--res":
        assert f"argument {flag}" in result.stderr, result.stderr


USAGE_ERRORS = {
    "min-lr above lr": (["--lr", "0.001", "--min-lr", "0.01"], "--min-lr 0.01 is above --lr 0.001"),
    "no moe layers": (["--moe-layers", ""], "--moe-layers ''"),
    "only commas": (["--moe-layers", ","], "--moe-layers ','"),
    "bad TINYMOE_KERNELS": ([], "TINYMOE_KERNELS='fast'"),
}


@pytest.mark.parametrize("flags, fragment", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_contradicting_train_options_are_usage_errors(workdir, tmp_path, flags, fragment):
    extra = {"TINYMOE_KERNELS": "fast"} if not flags else {}
    result = tinymoe("train", "--data", workdir / "data.txt", "--steps", "2", "--out", tmp_path / "run", *TINY, *flags,
                     cwd=tmp_path, **extra)
    assert_one_line_error(result, fragment)
    assert result.returncode == 2
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_argument_errors_name_the_argument_and_exit_2(tmp_path):
    result = tinymoe("train", "--steps", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tinymoe train: error: argument --steps")


def _truncated_checkpoint(trained, directory):
    raw = (trained[0] / "checkpoint.npz").read_bytes()
    return _write(directory / "truncated.npz", raw[: len(raw) // 2])


SAMPLE_ERRORS = {
    "unknown prompt characters": (lambda trained, d: ["--checkpoint", trained[0], "--prompt", "ZQ#"], "Q"),
    "missing checkpoint": (lambda trained, d: ["--checkpoint", d / "nothing"], "nothing"),
    "truncated checkpoint": (lambda trained, d: ["--checkpoint", _truncated_checkpoint(trained, d)], "truncated"),
    "text file as checkpoint": (lambda trained, d: ["--checkpoint", _write(d / "notes.txt", "hello\n")], "notes.txt"),
    "cuda without cupy": pytest.param(lambda trained, d: ["--checkpoint", trained[0], "--device", "cuda"], "cuda",
                                      marks=NO_GPU),
}


@pytest.mark.parametrize("make_args, fragment", SAMPLE_ERRORS.values(), ids=SAMPLE_ERRORS.keys())
def test_sample_user_errors_are_one_line(trained, tmp_path, make_args, fragment):
    result = tinymoe("sample", *make_args(trained, tmp_path), "--length", "5", cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_sample_with_an_npy_file_names_it(tmp_path):
    with open(tmp_path / "weights.npy", "wb") as handle:
        np.save(handle, np.ones(3))
    assert_one_line_error(tinymoe("sample", "--checkpoint", tmp_path / "weights.npy", cwd=tmp_path), "weights.npy")


def test_sample_with_a_corrupt_zip_directory_is_one_line(trained, tmp_path):
    raw = bytearray((trained[0] / "checkpoint.npz").read_bytes())
    directory = raw.index(b"PK\x01\x02")  # the first central-directory entry
    raw[directory + 10] ^= 0xFF  # its compression method
    path = _write(tmp_path / "checkpoint.npz", bytes(raw))
    with zipfile.ZipFile(path) as archive:  # the archive still opens: only reading a member fails
        assert archive.namelist()
    assert_one_line_error(tinymoe("sample", "--checkpoint", path, cwd=tmp_path))


@NO_GPU
def test_gradcheck_cuda_without_cupy_is_one_line(tmp_path):
    assert_one_line_error(tinymoe("gradcheck", "--device", "cuda", cwd=tmp_path), "cuda")


FAKE_CUPY = {
    "no device": "def getDeviceCount():\n    return 0\n",
    "no driver": "def getDeviceCount():\n    raise RuntimeError('cudaErrorInsufficientDriver')\n",
}


@pytest.mark.parametrize("runtime", FAKE_CUPY.values(), ids=FAKE_CUPY.keys())
def test_cuda_with_cupy_but_no_gpu_is_one_line(workdir, tmp_path, runtime):
    """A stand-in `cupy` package that imports but finds no usable device (CuPy installed on a CPU machine)."""
    package = tmp_path / "fake" / "cupy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = '99.0-fake'\nfrom . import cuda\n")
    (package / "cuda.py").write_text("class runtime:\n" + "".join(
        "    " + line + "\n" for line in ["@staticmethod", *runtime.splitlines()]))
    fake = {"PYTHONPATH": str(tmp_path / "fake")}
    result = tinymoe("train", "--data", workdir / "data.txt", "--steps", "2", "--out", tmp_path / "run", "--device",
                     "cuda", *TINY, cwd=tmp_path, **fake)
    assert_one_line_error(result, "CUDA device")
    assert_one_line_error(tinymoe("gradcheck", "--device", "cuda", cwd=tmp_path, **fake), "CUDA device")
    info = tinymoe("info", cwd=tmp_path, **fake)
    assert_ok(info)
    assert "99.0-fake" in info.stdout
    (cuda_row,) = [line for line in info.stdout.splitlines() if line.startswith("cuda ")]
    assert "unavailable" in cuda_row and "CUDA device" in cuda_row
    assert "kernels (cuda)" not in info.stdout
