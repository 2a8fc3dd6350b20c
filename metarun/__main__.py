"""`python -m metarun` and the `metarun` command.

Signal handlers go in first, before the slow imports (torch, Hydra): a Ctrl-C or SIGTERM
while metarun is still starting ends it with a message and the signal's status, never a
traceback or a silent death. The CLI replaces them with its own once it runs.
"""

import signal
import sys


def _starting(signum, frame):
    print(f"metarun: interrupted by {signal.Signals(signum).name} while starting", file=sys.stderr)
    sys.exit(128 + signum)


SUBCOMMANDS = {
    "report": "metarun.runners.report",  # metarun report FOLDER... [--out DIR]
    "sync": "metarun.runners.sync",  # metarun sync SWEEP_OR_RUN_FOLDER...
}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:])
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _starting)
    from metarun.runners.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
