"""The `tinymoe` command line: train, sample, gradcheck, info."""
from .main import main

__all__ = ["main"]
