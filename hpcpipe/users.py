"""User names for "cancelled by": sacct names a uid, hpcpipe and the local runner a name."""

from __future__ import annotations

import os
import pwd


def user_name(uid: int | str | None = None) -> str:
    """The login name of ``uid`` (this process's user by default); a name is returned as is,
    an unknown uid as its number."""
    if uid is None:
        uid = os.getuid()
    if isinstance(uid, str) and not uid.isdigit():
        return uid
    try:
        return pwd.getpwuid(int(uid)).pw_name
    except KeyError:
        return str(uid)
