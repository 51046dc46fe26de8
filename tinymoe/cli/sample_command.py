"""`tinymoe sample`: print text sampled from a trained checkpoint."""
from __future__ import annotations

from .arguments import UsageError, add_option, non_negative_float, non_negative_int, positive_int


def add_parser(commands) -> None:
    parser = commands.add_parser("sample", help="sample text from a checkpoint", description=__doc__)
    add_option(parser, "--checkpoint", metavar="DIR", default="runs/tinymoe",
               help="a training --out DIR (as `tinymoe train` writes it) or a .npz file")
    add_option(parser, "--prompt", default="", help="text to continue", default_text="start of a line")
    add_option(parser, "--length", type=positive_int, default=200, help="characters to generate")
    add_option(parser, "--temperature", type=non_negative_float, default=0.8,
               help="divides the logits before sampling; 0 means greedy (always the most likely character)")
    add_option(parser, "--top-k", type=positive_int, help="sample from the k most likely characters only",
               default_text="all")
    add_option(parser, "--seed", type=non_negative_int, default=0, help="seed of the sampler")
    add_option(parser, "--device", choices=("cpu", "cuda"), default="cpu", help="where to run the model")
    parser.set_defaults(run=run_sample)


def run_sample(args) -> int:
    from ..train.checkpoint import load_trained_model
    from .arguments import prepare_run

    prepare_run(args)
    model, vocab = load_trained_model(args.checkpoint, args.device)
    prompt = args.prompt or ("\n" if "\n" in vocab else vocab[0])
    unknown = sorted(set(prompt) - set(vocab))
    if unknown:
        raise UsageError(f"--prompt has characters the model never saw: {''.join(unknown)!r}")
    # Greedy decoding as the limit temperature -> 0: only the most likely character keeps any probability.
    temperature, top_k = (1.0, 1) if args.temperature == 0 else (args.temperature, args.top_k)
    tokens = model.generate([vocab.index(c) for c in prompt], args.length, temperature, top_k, args.seed)
    print((args.prompt or "") + "".join(vocab[t] for t in tokens))
    return 0
