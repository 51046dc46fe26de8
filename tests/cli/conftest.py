"""Fixtures of the command-line tests: a work directory with a small text, and one tiny training run shared by
every test that reads its outputs."""
import pytest

from cli_helpers import TEXT, TINY, assert_ok, tinymoe


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    (directory / "data.txt").write_text(TEXT, encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def trained(workdir):
    """One tiny `tinymoe train` run shared by the tests that read its outputs (4 steps, evals at 2 and 4)."""
    result = tinymoe("train", "--data", "data.txt", "--steps", "4", "--out", "run", *TINY, cwd=workdir)
    assert_ok(result)
    return workdir / "run", result
