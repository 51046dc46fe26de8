"""Train a deliberately unbalanced MoE run, then ask `tinymoe doctor` what is wrong with it.

The run: 8 experts, top-2, no load-balance loss (--aux-coef 0) and a tiny capacity factor (0.5: each expert
keeps C = ceil(0.5·T·2/8) rows, half its fair share). Nothing keeps the router even and capacity drops most
of what an overloaded expert is asked for, so the doctor should report routing problems with the numbers
that show them and a `tinymoe train` line to try next. Same as, in a shell:

    tinymoe train --out runs/examples/diagnose --overwrite --aux-coef 0 --capacity-factor 0.5 ...
    tinymoe doctor runs/examples/diagnose

    python examples/diagnose_run.py      # ~5 s; the run lands in runs/examples/diagnose
"""
import contextlib
import io

from tinymoe.cli.main import main
from tinymoe.train.doctor import diagnose

run_dir = "runs/examples/diagnose"
train = ["train", "--out", run_dir, "--overwrite", "--steps", "150", "--eval-every", "25", "--eval-batches", "2",
         "--batch-size", "8", "--seq-len", "32", "--d-model", "32", "--layers", "1", "--d-ff", "32",
         "--experts", "8", "--top-k", "2", "--aux-coef", "0", "--capacity-factor", "0.5", "--seed", "0"]
print("tinymoe " + " ".join(train))
log = io.StringIO()
with contextlib.redirect_stdout(log):          # the training progress lines; the last few are shown below
    status = main(train)
print("\n".join("  " + line for line in log.getvalue().strip().splitlines()[-3:]))
if status != 0:
    raise SystemExit(f"tinymoe train failed with exit status {status}")

print()
report = diagnose(run_dir)                      # what `tinymoe doctor runs/examples/diagnose` prints
print(report.to_text())
print(f"\nhealthy: {report.healthy}; findings: {', '.join(finding.kind for finding in report.findings) or 'none'}")
