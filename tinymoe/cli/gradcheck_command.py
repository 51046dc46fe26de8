"""`tinymoe gradcheck`: run the float64 gradient checks of every op and layer here, print a table. The MoE
layers are checked with their routing decisions as the discrete state: a perturbation that flips a token's
experts is excluded (and counted), not compared. Exit status 1 when a check fails."""
from __future__ import annotations

from .arguments import add_option, prepare_run


def add_parser(commands) -> None:
    parser = commands.add_parser("gradcheck", help="check every hand-written gradient on this machine",
                                 description=__doc__)
    add_option(parser, "--device", choices=("cpu", "cuda"), default="cpu", help="where to run the checks")
    add_option(parser, "--verbose", action="store_true",
               help="after each row, the full report: tolerances, worst comparisons, excluded perturbations")
    parser.set_defaults(run=run_gradcheck)


def run_gradcheck(args) -> int:
    from ..selfcheck import run_all

    prepare_run(args)
    results = run_all(args.device)
    width = max(len(result.name) for result in results)
    print(f"{'check':<{width}}  result  seconds")
    for result in results:
        status = "ok" if result.passed else "FAILED"
        line = f"{result.name:<{width}}  {status:<6}  {result.seconds:7.2f}"
        print(line + (f"  {result.detail}" if result.detail else ""))
        if args.verbose and result.report is not None:
            print("    " + result.report.format().replace("\n", "\n    "))
    failed = [result.name for result in results if not result.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed (float64, device={args.device})")
    return 1 if failed else 0
