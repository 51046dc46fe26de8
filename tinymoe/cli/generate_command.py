"""`tinymoe generate`: continue a prompt with a transformers-format checkpoint (config.json + safetensors, as
`tinymoe.models.from_pretrained` loads them), print the decoded text, and on stderr the prefill and decode speed.

The prompt is tokenized with the checkpoint's tokenizer.json by the `tokenizers` package (pip install
'tinymoe[hf]'); --prompt-ids 1,2,3 gives token ids instead and needs NumPy alone. Decoding is greedy at
--temperature 0 (the default), else sampling with --top-k / --top-p from --seed (tinymoe.models.generation), and
stops at the config's eos token. With --prompt the output is text; with --prompt-ids, the ids (prompt and new). --show-routing prints, for every generated token, the experts it visited in each
MoE layer: the experts the layer gave rows to in the one-token forward that fed it in.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .arguments import UsageError, add_option, non_negative_float, non_negative_int, positive_int

TOKENIZER_NAME = "tokenizer.json"


def probability(text: str) -> float:
    import argparse

    value = non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def token_ids(text: str) -> list:
    import argparse

    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids >= 0 like 1,2,3, got {text!r}")
    return ids


def add_parser(commands) -> None:
    parser = commands.add_parser("generate", help="continue a prompt with a transformers-format checkpoint",
                                 description=__doc__)
    add_option(parser, "--model", metavar="DIR", required=True,
               help="checkpoint directory: config.json, model.safetensors (or shards), tokenizer.json")
    prompt = parser.add_mutually_exclusive_group(required=True)
    add_option(prompt, "--prompt", metavar="TEXT", help="text to continue (tokenized with DIR/tokenizer.json)")
    add_option(prompt, "--prompt-ids", metavar="IDS", type=token_ids,
               help="comma-separated token ids to continue, instead of --prompt (no tokenizer needed)")
    add_option(parser, "--max-new-tokens", metavar="N", type=non_negative_int, default=32, help="tokens to generate")
    add_option(parser, "--temperature", metavar="T", type=non_negative_float, default=0.0,
               help="divides the logits before sampling; 0 is greedy decoding")
    add_option(parser, "--top-k", metavar="K", type=positive_int, help="sample from the K most likely tokens only",
               default_text="all")
    add_option(parser, "--top-p", metavar="P", type=probability,
               help="sample from the smallest set of tokens whose probability reaches P (nucleus)", default_text="1")
    add_option(parser, "--seed", metavar="S", type=non_negative_int, default=0, help="seed of the sampler")
    add_option(parser, "--show-routing", action="store_true",
               help="print the experts each generated token visited, per MoE layer")
    add_option(parser, "--device", choices=("cpu", "cuda"), default="cpu", help="where to run the model")
    parser.set_defaults(run=run_generate)


def load_tokenizer(directory):
    """The `tokenizers.Tokenizer` of DIR/tokenizer.json (BackendUnavailableError naming the extra when the
    package is missing; UsageError when the file is)."""
    from ..engine.backend import import_optional

    path = os.path.join(directory, TOKENIZER_NAME)
    if not os.path.isfile(path):
        raise UsageError(f"--model {directory} has no {TOKENIZER_NAME}; give token ids with --prompt-ids instead")
    tokenizers = import_optional("tokenizers", "'tinymoe[hf]'", "--prompt needs the tokenizers package")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises its own Exception subclass for a malformed file
        from ..train.checkpoint import CheckpointError
        raise CheckpointError(f"{path} is not a tokenizers file: {error}") from None


def load_model(directory, device="cpu", dtype="float32"):
    """from_pretrained(directory), with a bad checkpoint reported as a CheckpointError (exit status 1)."""
    from ..models import from_pretrained
    from ..train.checkpoint import CheckpointError

    try:
        return from_pretrained(directory, dtype=dtype, device=device)
    except (ValueError, NotImplementedError) as error:
        raise CheckpointError(str(error)) from None


def decode(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, eos=(),
           routing=False):
    """Greedy or sampled decoding of one prompt with a KV cache, as tinymoe.models.generation.generate does it
    (the same tokens for the same arguments), timed by phase. Returns (tokens: list of the new ids,
    prefill seconds, decode seconds, visited: per new token {decoder layer: expert ids} when `routing`)."""
    from ..engine.autograd import no_grad
    from ..engine.backend import to_numpy
    from ..models.generation import next_token_distribution, sample_tokens

    generator = np.random.default_rng(seed)
    moe_layers = [(index, layer.mlp) for index, layer in enumerate(model.model.layers) if layer.is_moe]
    fast = getattr(model, "next_token_logits", None)

    def step(ids, cache):  # the regular forward when routing is read: it sets each MoE layer's stats
        if routing or fast is None:
            return to_numpy(model(ids, cache).data[:, -1])
        return to_numpy(fast(ids, cache))

    tokens, visited = [], []
    model.eval()
    with no_grad():
        ids = np.asarray([prompt_ids], dtype=np.int64)
        cache = model.new_cache(1, len(prompt_ids) + max_new_tokens + 1)
        started = time.perf_counter()
        last = step(ids, cache).astype(np.float64) if max_new_tokens else None
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for index in range(max_new_tokens):
            if temperature == 0:
                chosen = int(np.argmax(last, axis=-1)[0])
            else:
                chosen = int(sample_tokens(next_token_distribution(last, temperature, top_k, top_p), generator)[0])
            tokens.append(chosen)
            finished = chosen in eos or index == max_new_tokens - 1
            if finished and not routing:
                break
            last = step(np.asarray([[chosen]], dtype=np.int64), cache).astype(np.float64)
            if routing:  # one token in: the experts given a row are the ones it visited
                visited.append({layer: np.flatnonzero(moe.stats.kept_per_expert).tolist() for layer, moe in moe_layers})
            if finished:
                break
    return tokens, prefill, time.perf_counter() - started, visited


def _eos_ids(model) -> tuple:
    eos = model.spec.eos_token_id
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def run_generate(args) -> int:
    from ..models.generation import _check_sampling
    from .arguments import check_device

    check_device(args.device)
    tokenizer = load_tokenizer(args.model) if args.prompt is not None else None
    model = load_model(args.model, args.device)
    vocab = model.vocab_size
    if args.show_routing and not model.moe_layers():
        raise UsageError(f"--show-routing: the {model.spec.model_type} model in {args.model} has no MoE layers")
    try:
        _check_sampling(args.temperature, args.top_k, args.top_p, vocab)
    except ValueError as error:
        raise UsageError(str(error).removeprefix("generate: ").replace("top_k=", "--top-k ")
                         .replace("top_p=", "--top-p ").replace("temperature", "--temperature")) from None
    if tokenizer is not None:
        prompt_ids = tokenizer.encode(args.prompt).ids
        if not prompt_ids:
            raise UsageError(f"--prompt {args.prompt!r} gives no tokens")
    else:
        prompt_ids = args.prompt_ids
        if max(prompt_ids) >= vocab:
            raise UsageError(f"--prompt-ids holds {max(prompt_ids)}, outside the vocabulary [0, {vocab})")
    tokens, prefill, decoding, visited = decode(model, prompt_ids, args.max_new_tokens, args.temperature,
                                                args.top_k, args.top_p, args.seed, _eos_ids(model),
                                                args.show_routing)
    if tokenizer is not None:
        print(tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True))
    else:
        print(",".join(str(token) for token in prompt_ids + tokens))
    for position, (token, layers) in enumerate(zip(tokens, visited)):
        shown = repr(tokenizer.decode([token])) if tokenizer is not None else str(token)
        print(f"token {position} {shown}: " + "; ".join(f"layer {layer} experts {experts}"
                                                        for layer, experts in layers.items()))
    sys.stdout.flush()
    print(f"prefill {len(prompt_ids)} tokens in {prefill:.3f} s ({len(prompt_ids) / max(prefill, 1e-9):,.0f} tok/s); "
          f"decode {len(tokens)} tokens in {decoding:.3f} s ({len(tokens) / max(decoding, 1e-9):,.0f} tok/s)",
          file=sys.stderr)
    return 0
