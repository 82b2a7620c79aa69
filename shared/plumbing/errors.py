"""User-facing errors.

Anything a user can fix (a bad file, a bad field, a missing path) is raised as
``IchfedError``. The CLI turns it into one line ``error: ...`` and exit code 2;
everything else is a bug and keeps its traceback.
"""


class IchfedError(Exception):
    """An error caused by user input; its message names the file or field and what is wrong."""


class BundleVerificationError(IchfedError):
    """A model bundle is unsigned, tampered with, or signed by an unexpected key."""
