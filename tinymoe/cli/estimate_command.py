"""`tinymoe estimate`: parameters (total and active per token), FLOPs per token and the memory of a training
step of the model that `tinymoe train` would build from the same options (or of a trained checkpoint), without
building it. Formulas: tinymoe/train/estimate.py."""
from __future__ import annotations

import json
import os

from .arguments import UsageError, add_option, positive_int
from .model_options import add_model_options, model_config

GENERATED_VOCAB = 41  # the symbols of the text `tinymoe train` generates (tinymoe.train.corpus)


_MODEL_FLAGS = []  # the model and MoE flags (filled by add_parser): not allowed with --checkpoint


def add_parser(commands) -> None:
    parser = commands.add_parser("estimate", help="parameters, FLOPs and memory of a model, without building it",
                                 description=__doc__, allow_abbrev=False)
    run = parser.add_argument_group("step")
    add_option(run, "--vocab-size", metavar="N", type=positive_int, default=GENERATED_VOCAB,
               help="symbols of the vocabulary (41: the text tinymoe generates; ignored with --checkpoint)")
    add_option(run, "--batch-size", metavar="N", type=positive_int, default=16,
               help="sequences per step (with --checkpoint: the run's, unless given); tokens per sequence: --seq-len")
    add_option(run, "--expert-parallel", metavar="P", type=positive_int, default=1,
               help="split the experts over P ranks (must divide --experts): memory per rank")
    add_option(run, "--checkpoint", metavar="PATH",
               help="take the model (and its run's batch size and sequence length) from a checkpoint.npz or a "
                    "`tinymoe train --out` directory instead of the model options; --seq-len and --batch-size "
                    "given too set the step", default_text="the model options")
    add_option(run, "--json", action="store_true", help="print the estimate as one JSON object")
    before = {action.dest for action in parser._actions}
    add_model_options(parser)
    _MODEL_FLAGS[:] = [action.option_strings[0] for action in parser._actions
                       if action.dest not in before and action.dest != "seq_len"]
    parser.set_defaults(run=run_estimate)


def _given(argv, flag) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def _checkpoint_config(path):
    from ..models import TransformerConfig
    from ..train.checkpoint import CheckpointError
    from ..train.doctor import read_checkpoint_meta

    file = os.path.join(path, "checkpoint.npz") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"--checkpoint {path}: no such file" + (" (no checkpoint.npz in it)" if os.path.isdir(path)
                                                                 else ""))
    meta = read_checkpoint_meta(file)  # CheckpointError (exit 1) for a damaged file
    try:
        config = TransformerConfig.from_dict(meta.get("model_config", {}))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: cannot read its model config ({error})") from None
    train = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    return config, train


def run_estimate(args) -> int:
    from ..train.estimate import estimate

    argv = getattr(args, "argv", [])
    batch_size, seq_len = args.batch_size, args.seq_len
    if args.checkpoint:
        model_flags = [flag for flag in _MODEL_FLAGS if _given(argv, flag)]
        if model_flags:
            raise UsageError(f"--checkpoint takes the model from {args.checkpoint}; drop {', '.join(model_flags)}")
        config, train = _checkpoint_config(args.checkpoint)
        if not _given(argv, "--batch-size"):
            batch_size = train.get("batch_size", batch_size)
        if not _given(argv, "--seq-len"):
            seq_len = min(train.get("seq_len", config.max_seq_len), config.max_seq_len)
    else:
        config = model_config(args, args.vocab_size)
    try:
        result = estimate(config, batch_size, seq_len, args.expert_parallel)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0
