"""The `tinymoe` command line: train, sample, generate, estimate, doctor, gradcheck, info."""
from .main import main

__all__ = ["main"]
