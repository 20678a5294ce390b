"""``python -m chaos``: one chaos run, its report, and an exit status.

Exit status: 0 when no job was lost and no unfenced concurrent copies ran, 1
otherwise, 2 when the run itself failed (a broker down, workers that would
not start). ``--analyze DIR`` prints the report of a saved run again.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .analysis import analyze
from .source import ROOT, describe, freeze, use


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/chaos", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="how long the chaos lasts (default 5)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4,
                        help="pool processes per worker (default 4)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="supervise interval in seconds (default 1)")
    parser.add_argument("--shortest", type=float, default=3.0,
                        help="shortest job in seconds (default 3)")
    parser.add_argument("--longest", type=float, default=60.0,
                        help="longest job in seconds (default 60)")
    parser.add_argument("--drain-minutes", type=float, default=10.0,
                        help="most minutes to wait for jobs after the chaos")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ref", default=None,
                        help="git commit of celery_turnout and tests/integration "
                             "to run (default: the working tree)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="run folder (default var/chaos/BROKER-TIME)")
    parser.add_argument("--analyze", type=Path, default=None, metavar="DIR",
                        help="only print the report of the run saved in DIR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the chaos (or analyse a saved run); return the exit status."""
    args = parse(argv)
    if args.analyze is not None:
        return report(args.analyze)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory: Path = args.dir or ROOT / "var" / "chaos" / f"{args.broker}-{stamp}"
    directory = directory.resolve()
    source = freeze(directory / "src", args.ref)
    use(source)
    from .run import ChaosConfig, run_chaos  # after use(): the frozen code

    config = ChaosConfig(
        broker=args.broker, minutes=args.minutes, jobs=args.jobs,
        workers=args.workers, concurrency=args.concurrency,
        interval=args.interval, shortest=args.shortest, longest=args.longest,
        drain_seconds=args.drain_minutes * 60,
        seed=args.seed if args.seed is not None else random.randrange(10**6),
    )
    command = os.environ.get("CHAOS_COMMAND") or shlex.join(
        ["python", "-m", "chaos", *sys.argv[1:]]
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_chaos(config, directory, command, describe(args.ref), source)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; every worker was killed\n")
        return 2
    except Exception as exc:
        sys.stderr.write(f"the chaos run failed: {exc!r}\n")
        return 2
    return report(directory)


def report(directory: Path) -> int:
    """Print the report of the run in ``directory`` (also to report.txt)."""
    result = analyze(directory)
    lines = result.lines()
    (directory / "report.txt").write_text("\n".join(lines) + "\n")
    verdict = "OK" if result.ok else "FAILED: lost jobs or unfenced concurrent copies"
    sys.stdout.write("\n".join([*lines, verdict]) + "\n")
    return 0 if result.ok else 1


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
