"""python -m analysis --csv FILE [...] | --experiment NAME | --parent-run ID: the same as
`scaling-suite analyze`. Bad input prints one `error:` line and exits 2."""

import argparse
import sys

from scaling_suite.errors import SuiteError

from .report import add_arguments, main


def cli(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m analysis", description="Fit scaling laws to runs in a CSV file or MLflow."))
    args = parser.parse_args(argv)
    try:
        return main(args)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
