"""Moved to :mod:`bilevel.runner.devices` with the rest of the run machinery; this name stays for one
release and is that very module (imports and monkeypatches reach the same object)."""

import sys

from bilevel.runner import devices as _moved

sys.modules[__name__] = _moved
