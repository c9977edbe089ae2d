"""Moved to :mod:`bilevel.runner.flags` (argparse types, the flags given, ``--resume``) and
:mod:`bilevel.runner.output` (output folders, JSON-lines logs, atomic writes) with the rest of the run
machinery; these names stay here for one release."""

from bilevel.runner.flags import (_TRACKED, add_run_flags, count, given_flags, real, restore, settings_of,
                                  track_given)
from bilevel.runner.output import (output_patterns, prepare_output, read_records, run_files, write_records,
                                   write_text_atomic)

__all__ = ["count", "real", "track_given", "given_flags", "settings_of", "add_run_flags", "restore",
           "prepare_output", "output_patterns", "run_files", "read_records", "write_records", "write_text_atomic"]
