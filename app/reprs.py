"""`short_repr`: values from input files quoted in error messages, cut to a readable size."""

from __future__ import annotations

import reprlib

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6


def short_repr(value: object) -> str:
    """`repr(value)` at most about 100 characters and 3 levels deep.

    A value read from a file can be a 10 MB string, a list nested a thousand deep (plain
    `repr` raises RecursionError) or a YAML alias bomb whose full repr would not fit in
    memory; a message needs only its start.
    """
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):  # an int of more than 4300 digits, an odd __repr__
        return f"<{type(value).__name__}>"
