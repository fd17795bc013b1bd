"""The one base class of errors a user can fix: bad data, a broken bundle, a wrong setting, missing weights.

The CLI prints a :class:`TfanetError` as one line and exits 2; anything else is a bug in tfanet and
is shown with its traceback. A subclass of ``ValueError`` so that callers which already catch
``ValueError`` around a data or config step keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "TfanetError"]


class TfanetError(ValueError):
    """Something the user gave tfanet (files, settings, a bundle) is wrong; the message says how to fix it."""


class ConfigError(TfanetError):
    """A setting (profile, ``--set`` override, ``params.yaml`` entry) is unknown or out of range."""
