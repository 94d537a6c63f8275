"""The folds rule's body: the sheet's records -> folds.tsv through `dsf folds`.

A script, not a shell command: the records are the rule's param (a changed sheet reruns it),
and a cohort's records outgrow the 128 KiB one command-line argument may hold (about 1,000
slides). Snakemake hands them over in the script's preamble, and `dsf folds` reads them from a
file; its messages go to the rule's log, its exit status is the job's.
"""

import contextlib
import shlex
import sys
import tempfile
from pathlib import Path

from dsf.folds import main

sm = snakemake  # type: ignore[name-defined]  # noqa: F821 - set by Snakemake's script preamble
out = Path(sm.output[0])
with tempfile.TemporaryDirectory(dir=out.parent, prefix=".folds-") as tmp:
    records = Path(tmp) / "sheet.json"
    records.write_text(sm.params.sheet)
    argv = ["--sheet-file", str(records), "--out", str(out), *shlex.split(sm.params.opts)]
    with open(sm.log[0], "w") as log, contextlib.redirect_stderr(log):
        code = main(argv)
sys.exit(code)
