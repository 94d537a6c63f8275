"""The areas rule's body: the maps of one init -> areas.tsv through `dsf areas`.

A script, not a shell command: a cohort's map paths outgrow the 128 KiB one command-line
argument may hold (a shell command is one argument of `bash -c`). Its messages go to the
rule's log, its exit status is the job's.
"""

import contextlib
import sys

from dsf.areas import main

sm = snakemake  # type: ignore[name-defined]  # noqa: F821 - set by Snakemake's script preamble
argv = ["--maps", *sm.input.maps, "--out", sm.output[0]]
with open(sm.log[0], "w") as log, contextlib.redirect_stderr(log):
    code = main(argv)
sys.exit(code)
