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


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _starting)
    from metarun.runners.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
