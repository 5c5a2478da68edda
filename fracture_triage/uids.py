"""The one rule for what a UID is (DICOM PS3.5 9.1), shared by the SCP, the worker and the SR.

PS3.5 9.1: a UID is components of digits separated by ".", at most 64 characters; the
first digit of a component may be 0 only if the component is a single digit ("1.2.03" is
not a UID); PS3.5 9.1 also requires at least two components (a root and a suffix). What the
SCP accepts must be what the SR can reference: a UID the SR builder would have to leave out
is refused at the door instead. A valid UID is also safe as a path component (digits and
dots only, no empty component: no "..", no "/").

Imports nothing of the project.
"""

from __future__ import annotations

import re

#: PS3.5 9.1 "UID Encoding Rules": the maximum length of a UID.
UID_MAX_LENGTH = 64

_COMPONENT = r"(?:0|[1-9][0-9]*)"
_UID_RE = re.compile(rf"{_COMPONENT}(?:\.{_COMPONENT})+")


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a UID by PS3.5 9.1 (digits, no leading zero, <= 64, >= 2 parts)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= UID_MAX_LENGTH
        and _UID_RE.fullmatch(value) is not None
    )
