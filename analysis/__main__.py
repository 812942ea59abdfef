"""python -m analysis --csv FILE [...] | --experiment NAME | --parent_run ID: the same as
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
        if not args.csv:
            # As the top-level caller, point MLflow at the project's store (MLFLOW_TRACKING_URI
            # when set, else sqlite:///mlruns/mlflow.db), as `scaling-suite` does; analysis.load
            # itself reads whatever mlflow.get_tracking_uri() gives.
            import mlflow   # lazy heavy library: a CSV analysis never needs it (analysis/load.py)

            from scaling_suite.store import tracking_uri
            mlflow.set_tracking_uri(tracking_uri())
        return main(args)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
