"""``lorm-flower``: the commands a user types, one console script (declared in pyproject.toml).

    lorm-flower simulate [--supernodes N] [--run-config "rank=8 beta=0.1"]   the app in Flower's simulation engine
                                                                            (deploy/simulate.py, scripts/simulate.sh)
    lorm-flower deploy [--supernodes N] [--tls] [--netns] ...     real SuperLink + SuperNodes here (deploy/local.py)
    lorm-flower compare [--betas 0.5 0.1] [--in-process] ...      strategies side by side (bench/compare_strategies.py)
    lorm-flower predict RUN_DIR [IMAGE ...] [--folder DIR]        classify images with a run's exported model
                                                                  (cli/predict.py)

Each command is the module's own ``main``: ``lorm-flower COMMAND --help`` lists every option it takes.
simulate, deploy and compare run the app from this source tree (Flower reads its pyproject.toml), so they need
the checkout that scripts/setup.sh installs in editable mode; predict needs only an exported model folder.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "simulate": ("deploy.simulate", "run the app in Flower's simulation engine (what scripts/simulate.sh runs)"),
    "deploy": ("deploy.local", "run it as real SuperLink + SuperNode processes on this machine"),
    "compare": ("bench.compare_strategies", "LoRM against FedAvg-LoRA, FFA-LoRA and RegMean: one table, one plot"),
    "predict": ("cli.predict", "top-k class names and probabilities for image files, from a run's exported model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="lorm-flower", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=list(COMMANDS), help="one of the commands above")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's own: lorm-flower COMMAND --help")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1] or ["--help"])  # prints the help, or the error naming the known commands
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    program, sys.argv[0] = sys.argv[0], f"lorm-flower {command}"  # the command's parser names itself from argv[0]
    try:
        return int(module.main(rest) or 0)
    finally:
        sys.argv[0] = program


if __name__ == "__main__":
    sys.exit(main())
