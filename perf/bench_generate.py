"""Greedy generation, tinymoe vs transformers eager, on the same random Qwen3-MoE-shaped checkpoint.

    python perf/bench_generate.py                       # ~98M parameters, batch 1, 64-token prompt, 128 new tokens
    python perf/bench_generate.py --small --rounds 1    # a quick check of the script itself

The checkpoint is written once (transformers' random init and save_pretrained, in a child process) into a
temporary directory; both implementations load it. initializer_range=0.1 instead of transformers' 0.02: with
0.02 the random model repeats one token forever (the same two experts every step, a weak greedy check); with
0.1 it produces ~127 distinct tokens of 128 and routes to every expert. Each measurement runs perf/generate_worker.py in its own
fresh process with its library's defaults (float32, greedy), the rows alternating A B C A B C ... over
--rounds rounds (shared/BENCHMARKS.md); ratios are taken round by round. Rows: tinymoe; transformers with its
default experts_implementation ("grouped_mm" in 5.x) and with experts_implementation="eager" (the per-expert
loop); both use transformers' default attention (sdpa). The target is against the faster transformers row of
each round. This script imports neither NumPy, torch nor tinymoe (standard library and bench_common only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine_lines, version  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_worker.py")
FULL = dict(model_type="qwen3_moe", vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, intermediate_size=1024, moe_intermediate_size=384, num_experts=16,
            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=4096,
            initializer_range=0.1)
SMALL = dict(FULL, hidden_size=128, num_hidden_layers=2, moe_intermediate_size=128, vocab_size=4000)
ROWS = {"tinymoe": ["tinymoe"], "transformers": ["transformers"],
        "transformers-eager-experts": ["transformers", "--experts", "eager"]}
TARGET = 1.25  # decode tokens/s of tinymoe over the faster transformers row


def child_env():
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_worker(arguments):
    done = subprocess.run([sys.executable, WORKER, *arguments], capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        raise SystemExit(f"worker {arguments} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values, digits=1):
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--small", action="store_true", help="a tiny model, to test the script")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {list(ROWS)}")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead of writing one")
    args = parser.parse_args(argv)
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or "tinymoe" not in rows:
        raise SystemExit(f"--rows={args.rows!r}: rows must include tinymoe and come from {list(ROWS)}")
    for line in machine_lines():
        print(line)
    print(f"transformers {version('transformers')}, safetensors {version('safetensors')}")
    config = SMALL if args.small else FULL
    with tempfile.TemporaryDirectory(prefix="tinymoe-generate-") as scratch:
        checkpoint = args.checkpoint or os.path.join(scratch, "checkpoint")
        if args.checkpoint is None:
            written = run_worker(["write", checkpoint, "--config", json.dumps(config)])
            print(f"model: {written['parameters'] / 1e6:.1f}M parameters, {json.dumps(config, sort_keys=True)}")
        print(f"batch 1, prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, float32, greedy; "
              f"{args.rounds} rounds of {rows} (each a fresh process)\n")
        common = ["--prompt-length", str(args.prompt_length), "--new-tokens", str(args.new_tokens)]
        results = {row: [] for row in rows}
        for round_index in range(args.rounds):
            for row in rows:
                kind, *extra = ROWS[row]
                result = run_worker(["run", kind, checkpoint, *common, *extra])
                results[row].append(result)
                print(f"round {round_index + 1} {row:28s} prefill {result['prefill_tok_s']:8.1f} tok/s  decode "
                      f"{result['decode_tok_s']:7.1f} tok/s  peak +{result['peak_growth_mib']:.2f} MiB  "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
        report(results, rows, args)


def report(results, rows, args):
    print("\n| implementation | prefill tok/s, median (min-max) | decode tok/s, median (min-max) | peak VmHWM growth "
          "MiB | resident after load MiB |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        runs = results[row]
        print(f"| {row} | {spread([r['prefill_tok_s'] for r in runs])} | {spread([r['decode_tok_s'] for r in runs])} "
              f"| {spread([r['peak_growth_mib'] for r in runs], 2)} | {spread([r['rss_model_mib'] for r in runs], 0)} |")
    peers = [row for row in rows if row != "tinymoe"]
    ours = results["tinymoe"]
    for peer in peers:
        decode = [o["decode_tok_s"] / p["decode_tok_s"] for o, p in zip(ours, results[peer])]
        prefill = [o["prefill_tok_s"] / p["prefill_tok_s"] for o, p in zip(ours, results[peer])]
        print(f"tinymoe / {peer}: decode {spread(decode, 2)}x per round {[round(r, 2) for r in decode]}; "
              f"prefill {spread(prefill, 2)}x")
    if peers:
        best = [o["decode_tok_s"] / max(results[peer][i]["decode_tok_s"] for peer in peers) for i, o in enumerate(ours)]
        met = statistics.median(best) >= TARGET
        print(f"tinymoe decode / the faster transformers row, per round: {[round(r, 2) for r in best]}; median "
              f"{statistics.median(best):.2f}x; target >= {TARGET}x: {'met' if met else 'NOT met'}")
    reference = ours[0]["tokens"]
    for row in rows:
        same = [run["tokens"] == reference for run in results[row]]
        first = next((i for i, (a, b) in enumerate(zip(results[row][0]["tokens"], reference)) if a != b), None)
        print(f"greedy check {row}: {'same' if all(same) else 'DIFFERENT'} {args.new_tokens} tokens as tinymoe round 1 "
              f"in {sum(same)}/{len(same)} rounds" + ("" if first is None else f" (first difference at token {first})")
              + f"; {len(set(reference))} distinct tokens")
    print(f"load average at the end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
