"""Download BACH from Zenodo (resumable), check its md5, extract the microscopy images as
data.data_dir takes them.

    python -m breastnet.download bach --to data/BACH --accept-licence

Without internet: download ``ICIAR2018_BACH_Challenge.zip`` elsewhere, copy it here and pass
it with ``--from-zip``. A failure is one line on stderr and exit status 1.
"""

import argparse
import os
import sys
from pathlib import Path

from breastnet.download.bach import RECORD, fetch_bach
from breastnet.download.fetch import ZENODO, ZENODO_ENV
from breastnet.errors import UserError

ACCEPT_ENV = "BREASTNET_ACCEPT_LICENCE"  # =1: accept BACH's licence without the flag (CI)


def main(argv: list[str] | None = None) -> None:
    """CLI: parse, fetch, and turn a user error into one line and exit status 1."""
    parser = argparse.ArgumentParser(
        prog="python -m breastnet.download",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[2],
    )
    parser.add_argument("dataset", choices=["bach"], help="the data set")
    parser.add_argument(
        "--to",
        type=Path,
        default=Path("data/BACH"),
        metavar="DIR",
        help="output folder (default data/BACH)",
    )
    parser.add_argument(
        "--accept-licence",
        action="store_true",
        default=os.environ.get(ACCEPT_ENV) == "1",
        help=f"accept BACH's licence, CC BY-NC-ND 4.0 (or {ACCEPT_ENV}=1)",
    )
    parser.add_argument(
        "--from-zip", type=Path, metavar="ZIP", help="a copied ICIAR2018_BACH_Challenge.zip"
    )
    parser.add_argument(
        "--md5", help="the md5 --from-zip must have (default: Zenodo's record, else built in)"
    )
    parser.add_argument(
        "--with-wsi", action="store_true", help="also the whole-slide images, into <to>_WSI"
    )
    parser.add_argument(
        "--zenodo-url",
        default=os.environ.get(ZENODO_ENV, ZENODO),
        help=f"server of record {RECORD} (default {ZENODO} or ${ZENODO_ENV})",
    )
    args = parser.parse_args(argv)
    try:
        fetch_bach(
            args.to, args.accept_licence, args.zenodo_url, args.from_zip, args.md5, args.with_wsi
        )
    except (UserError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("Interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
