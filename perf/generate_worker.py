"""One measurement of bench_generate.py, in its own process: load a checkpoint with one implementation, greedy
decode, print one JSON line.

    python perf/generate_worker.py write DIR --config JSON           a random checkpoint (transformers' init)
    python perf/generate_worker.py run tinymoe|transformers DIR --prompt-length 64 --new-tokens 128 [--tokens-out F]

Timing of `run` (both implementations the same way, through their public generate() with a streamer, whose
put() transformers and tinymoe call with the prompt and then with each new token as soon as it is chosen):
    warm-up: one generate(prompt, 4 new tokens) (Numba compilation, thread pools, first-touch allocations)
    then one generate(prompt, N new tokens): t0 = the call, t1 = the first new token's put, tN = the last's
    prefill tokens/s = L / (t1 - t0)  (time to the first token: prompt forward + the first choice)
    decode tokens/s  = (N - 1) / (tN - t1)
Peak memory: the growth of VmHWM (/proc/self/status) over the timed generate calls, after resetting it to the
current resident size (`echo 5 > /proc/self/clear_refs`), so that loading's peak does not hide generation's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak():
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class Clock:
    """A streamer that records when each put() arrives (the prompt's, then one per new token)."""

    def __init__(self):
        self.times = []

    def put(self, ids):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def write_checkpoint(directory, config, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    model.eval().save_pretrained(directory)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(json.dumps({"parameters": int(count), "directory": directory}))


def load(implementation, directory, args):
    if implementation == "tinymoe":
        import tinymoe as tm
        from tinymoe.models import from_pretrained

        model = from_pretrained(directory, dtype="float32")

        def generate(prompt, new_tokens, streamer=None):
            return np.asarray(model.generate(prompt, max_new_tokens=new_tokens, streamer=streamer))

        versions = {"tinymoe": tm.__version__, "numpy": np.__version__,
                    "kernels": tm.kernels.chosen("cpu")}
        return generate, versions
    import torch
    import transformers

    options = {"dtype": torch.float32}
    if args.attention:
        options["attn_implementation"] = args.attention
    if args.experts:
        options["experts_implementation"] = args.experts
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, **options).eval()
    model.generation_config.eos_token_id = None  # never stop early: exactly N new tokens
    model.generation_config.pad_token_id = 0

    def generate(prompt, new_tokens, streamer=None):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1,
                                 top_k=None, top_p=None, temperature=None, streamer=streamer)
        return out.numpy()

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
                "experts": getattr(model.config, "_experts_implementation", None)}
    return generate, versions


def run(args):
    rss_start = status_kib("VmRSS")
    started = time.perf_counter()
    generate, versions = load(args.implementation, args.checkpoint, args)
    load_seconds = time.perf_counter() - started
    vocab = json.load(open(os.path.join(args.checkpoint, "config.json")))["vocab_size"]
    prompt = np.random.default_rng(args.seed).integers(0, vocab, (1, args.prompt_length)).astype(np.int64)
    started = time.perf_counter()
    generate(prompt, min(4, args.new_tokens))
    warmup_seconds = time.perf_counter() - started
    rss_before = status_kib("VmRSS")
    peak_was_reset = reset_peak()
    hwm_before = status_kib("VmHWM")
    clock = Clock()
    started = time.perf_counter()
    tokens = generate(prompt, args.new_tokens, clock)
    full_seconds = time.perf_counter() - started
    hwm_after = status_kib("VmHWM")
    if len(clock.times) != args.new_tokens + 1:
        raise SystemExit(f"{args.implementation}: the streamer saw {len(clock.times)} puts, expected {args.new_tokens + 1}")
    prefill_seconds = clock.times[1] - started
    decode_seconds = clock.times[-1] - clock.times[1]
    new = tokens[0, args.prompt_length:].tolist()
    if len(new) != args.new_tokens:
        raise SystemExit(f"{args.implementation} produced {len(new)} tokens, expected {args.new_tokens}")
    result = {
        "implementation": args.implementation, "versions": versions,
        "load_s": load_seconds, "warmup_s": warmup_seconds, "prefill_s": prefill_seconds, "full_s": full_seconds,
        "prefill_tok_s": args.prompt_length / prefill_seconds,
        "decode_tok_s": (args.new_tokens - 1) / decode_seconds,
        "peak_growth_mib": (hwm_after - hwm_before) / 1024 if peak_was_reset else None,
        "rss_model_mib": (rss_before - rss_start) / 1024, "tokens": new,
    }
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write")
    writer.add_argument("checkpoint")
    writer.add_argument("--config", required=True, help="config.json fields as a JSON object (with model_type)")
    writer.add_argument("--seed", type=int, default=0)
    runner = commands.add_parser("run")
    runner.add_argument("implementation", choices=("tinymoe", "transformers"))
    runner.add_argument("checkpoint")
    runner.add_argument("--prompt-length", type=int, default=64)
    runner.add_argument("--new-tokens", type=int, default=128)
    runner.add_argument("--seed", type=int, default=0)
    runner.add_argument("--attention", default=None, help="transformers' attn_implementation (default: its own)")
    runner.add_argument("--experts", default=None, help="transformers' experts_implementation (default: its own)")
    args = parser.parse_args(argv)
    if args.command == "write":
        write_checkpoint(args.checkpoint, json.loads(args.config), args.seed)
    else:
        run(args)


if __name__ == "__main__":
    sys.exit(main())
