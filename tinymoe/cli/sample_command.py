"""`tinymoe sample`: print text sampled from a trained checkpoint."""
from __future__ import annotations

import argparse

from .main import UsageError, positive_float, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser("sample", help="sample text from a checkpoint", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help="a training --out DIR or a .npz file")
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a line)")
    parser.add_argument("--length", type=positive_int, default=200)
    parser.add_argument("--temperature", type=positive_float, default=0.8)
    parser.add_argument("--top-k", type=positive_int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.set_defaults(run=run_sample)


def run_sample(args) -> int:
    from ..train.checkpoint import load_trained_model

    model, vocab = load_trained_model(args.checkpoint, args.device)
    prompt = args.prompt or ("\n" if "\n" in vocab else vocab[0])
    unknown = sorted(set(prompt) - set(vocab))
    if unknown:
        raise UsageError(f"--prompt has characters the model never saw: {''.join(unknown)!r}")
    tokens = model.generate([vocab.index(c) for c in prompt], args.length, args.temperature, args.top_k, args.seed)
    print((args.prompt or "") + "".join(vocab[t] for t in tokens))
    return 0
