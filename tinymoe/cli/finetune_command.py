"""`tinymoe train --from-pretrained DIR --data FILE`: fine-tune a transformers-format checkpoint on a text file,
tokenized with DIR/tokenizer.json (the `tokenizers` package: pip install 'tinymoe[hf]'), and write the result to
--out with save_pretrained (config.json, model.safetensors, and the tokenizer files copied), so that
`tinymoe generate --model OUT` and `from_pretrained(OUT)` load it. The loop: tinymoe.train.finetune. As with
`tinymoe train`, an --out that already holds a model or a run is refused unless --overwrite is given."""
from __future__ import annotations

import os
import shutil

from .arguments import UsageError, prepare_run

FROM_PRETRAINED_HELP = ("fine-tune the transformers-format checkpoint in DIR (config.json, model.safetensors, "
                        "tokenizer.json) on --data instead of training a new model; the model and MoE options "
                        "come from DIR's config, the optimization options apply")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# `tinymoe train` options that do not apply to a fine-tuning run (the model is DIR's).
NOT_WITH_PRETRAINED = ("--resume", "--expert-parallel", "--checkpoint-every", "--d-model", "--layers", "--heads",
                       "--dropout", "--moe-layers", "--z-coef", "--noisy-coef")


def _given(argv, flag) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def run_finetune(args, train_config) -> int:
    """train_config: the TrainConfig of the run options (built by train_command._configs' rules)."""
    from ..train.data import DataError, read_text
    from ..train.finetune import existing_run_file, finetune
    from .generate_command import load_model, load_tokenizer

    moe_flags = [f"--{flag}" for flag in _moe_flags()]
    refused = [flag for flag in (*NOT_WITH_PRETRAINED, *moe_flags) if _given(args.argv, flag)]
    if refused:
        raise UsageError(f"--from-pretrained takes the model from {args.from_pretrained}; {', '.join(refused)} "
                         "do not apply to fine-tuning")
    if args.data is None:
        raise UsageError("--from-pretrained needs --data FILE, the text to fine-tune on")
    prepare_run(args)
    if os.path.abspath(args.out) == os.path.abspath(args.from_pretrained):
        raise UsageError(f"--out {args.out} is the --from-pretrained directory; write the fine-tuned model elsewhere")
    existing = existing_run_file(args.out)  # checked before the model loads; finetune() checks it again
    if existing and not args.overwrite:
        raise UsageError(_taken(args.out, existing))
    tokenizer = load_tokenizer(args.from_pretrained)
    model = load_model(args.from_pretrained, args.device, args.dtype)
    try:
        tokens = tokenizer.encode(read_text(args.data)).ids
        print(f"fine-tuning {model.num_parameters():,} parameters of {args.from_pretrained} on {args.device} "
              f"({len(tokens):,} tokens of {args.data})", flush=True)
        summary = finetune(model, tokens, train_config, args.out, aux_coef=args.aux_coef,
                           overwrite=bool(args.overwrite))  # store_true flags default to None here
    except DataError as error:
        raise UsageError(str(error)) from None
    except FileExistsError:  # written meanwhile by another command
        raise UsageError(_taken(args.out, existing_run_file(args.out) or "files of another run")) from None
    for name in TOKENIZER_FILES:
        source = os.path.join(args.from_pretrained, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(args.out, name))
    print(f"train loss {summary['first_train_loss']:.4f} -> {summary['train_loss']:.4f}, validation loss "
          f"{summary['val_loss']:.4f} in {summary['seconds']:.0f} s")
    print(f"wrote config.json, model.safetensors, metrics.jsonl, summary.json and the tokenizer to {args.out}")
    return 0


def _taken(out: str, existing: str) -> str:
    """The refusal of an --out that holds a model or run (train_command's wording; nothing here resumes)."""
    return (f"--out {out} already holds a model or training run ({existing}); fine-tuning does not continue it: "
            "write elsewhere with another --out, or replace it with --overwrite")


def _moe_flags() -> list:
    import dataclasses

    from ..nn.moe_config import MoEConfig

    return [field.metadata["flag"] for field in dataclasses.fields(MoEConfig) if field.metadata.get("flag")]
