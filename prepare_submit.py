"""Build the Gradescope zip of the CS224N GPT-2 project, checked.

    python prepare_submit.py                 # writes cs224n_default_final_project_submission.zip
    python prepare_submit.py --overwrite     # replace an existing zip
    python prepare_submit.py --dry_run       # only list and check

Packs what the course's prepare_submit.py packs (every root .py file, predictions/, models/,
modules/) plus the local packages those files import (cli/, tasks/, engine/...), and never the virtual
environment, data, run folders, caches or checkpoints. Before writing it checks that the
prediction files the autograder reads are in the starter's exact format (one prediction per
example of the matching data/ file) and that the graders' imports work from the zip alone;
with a problem it writes nothing and exits with status 2 (``--force`` writes anyway).
Missing prediction files (tasks not done yet) are listed, not fatal. It names the files the
autograder reads and the run each packed one came from (``predictions/provenance.json``):
a file from a partial run (``--limit``, splits carved offline) is an error, a file of unknown
origin a warning, and so is a file the autograder never reads (``lora-sst-dev-out.csv``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cli.defaults import DefaultsHelpFormatter
from tasks.submission import ZIP_NAME, Report, graded_names, prepare


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--output", default=ZIP_NAME, help=f"zip to write (default {ZIP_NAME})")
    p.add_argument("--root", default=".", help="project folder to pack (default: here)")
    p.add_argument("--data_dir", default=None,
                   help="folder of the data files the predictions are counted against (default: root/data)")
    p.add_argument("--overwrite", action="store_true", help="replace the zip if it exists (default: refuse)")
    p.add_argument("--force", action="store_true", help="write the zip even if a check fails")
    p.add_argument("--dry_run", action="store_true", help="list and check, write nothing")
    p.add_argument("--no_import_check", action="store_true",
                   help="skip importing the graders' modules from the unpacked zip (a python process)")
    return p.parse_args(argv)


def print_report(report: Report, output: str) -> None:
    total = sum(n for _, n in report.packed)
    print(f"packed {len(report.packed)} files ({total / 1e6:.1f} MB before compression):")
    for path, n in report.packed:
        print(f"  {path.as_posix():60s} {n / 1e3:10.1f} kB")
    print(f"the autograder reads predictions/{{{','.join(graded_names())}}}")
    for line in report.origins:
        print(line)
    if report.missing:
        print(f"not there (those tasks will not be graded): {', '.join(report.missing)}")
    for w in report.warnings:
        print(f"warning: {w}")
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    if report.written:
        print(f"Submission zip file created: {output}")
    elif report.errors:
        print("no zip written: fix the errors above, or pass --force", file=sys.stderr)


def main(argv: list[str] | None = None) -> Report:
    args = get_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp, ZIP_NAME) if args.dry_run else Path(args.output)
        try:
            report = prepare(args.root, output, overwrite=args.overwrite, force=args.force, data_dir=args.data_dir,
                             import_check=not args.no_import_check)
        except (FileExistsError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        report.written = report.written and not args.dry_run
    print_report(report, args.output)
    if report.errors and not args.force:
        raise SystemExit(2)
    return report


if __name__ == "__main__":
    main()
