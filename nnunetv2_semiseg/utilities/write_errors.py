"""One-line messages for output that cannot be written: disk full, read-only, not permitted, below a file.

The writers our commands use report these in their own words, often without an errno: torch.save says
``unexpected pos``, blosc2 ``Error while creating the NDArray``, ITK's NIfTI writer ``NWAD: wrote only 0 of ...``.
:func:`describe_write_failure` recognises the errno (anywhere in the exception chain) or those messages and says
which path and why, so a command can print it instead of a traceback. The commands write into a temporary folder
and rename it into place, so the message can add that nothing already written was touched.
"""
import errno
import os
import shutil
from typing import Optional

_REASONS = {
    errno.ENOSPC: ('the disk is full (ENOSPC)', 'Free space there or choose another output location'),
    errno.EDQUOT: ('the disk quota is exhausted (EDQUOT)', 'Free space there or choose another output location'),
    errno.EROFS: ('the file system is read-only (EROFS)', 'Choose an output location on a writable file system'),
    errno.EACCES: ('it is not writable (EACCES: permission denied)',
                   'Choose a writable output location or fix its permissions'),
    errno.EPERM: ('it is not writable (EPERM: operation not permitted)',
                  'Choose a writable output location or fix its permissions'),
    errno.ENOTDIR: ('a part of the path is a file, not a folder (ENOTDIR)',
                    'Choose an output location that is not below a file'),
}
# Writers that fail on a full disk without an errno.
_NO_ERRNO_MARKERS = ('unexpected pos', 'file write failed', 'Error while creating the NDArray', 'NWAD',
                     'wrote only', 'Could not create IO object', 'No space left')
# Below this much free space, a write that failed without an errno is taken for a full disk.
_LOW_SPACE_BYTES = 64 * 1024 * 1024


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        # 'raise ... from None' hides the context on purpose (e.g. a read error already reported by name)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)


def _existing_ancestor(path: str) -> Optional[str]:
    path = os.path.abspath(path)
    while path and not os.path.isdir(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


def _file_in_path(path: str) -> Optional[str]:
    """The first component of ``path`` that exists and is not a folder (the cause of ENOTDIR)."""
    current = os.path.abspath(path)
    parts = []
    while True:
        parent = os.path.dirname(current)
        parts.append(current)
        if parent == current:
            break
        current = parent
    for candidate in reversed(parts):
        if os.path.lexists(candidate) and not os.path.isdir(candidate):
            return candidate
    return None


def describe_write_failure(exc: BaseException, target) -> Optional[str]:
    """'Cannot write <path>: <reason>. <fix>.' if ``exc`` is a failed write, else None.

    ``target``: the output the command was making (named when the failing file is not known)."""
    target = os.fspath(target)
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _REASONS:
            reason, fix = _REASONS[e.errno]
            where = os.fspath(e.filename) if e.filename else target
            if e.errno == errno.ENOTDIR:
                blocking = _file_in_path(where) or _file_in_path(target)
                if blocking:
                    reason = f'{blocking} is a file, not a folder (ENOTDIR)'
            return f'Cannot write {where}: {reason}. {fix}.'
    for e in _chain(exc):
        text = str(e)
        if isinstance(e, (RuntimeError, OSError)) and any(m in text for m in _NO_ERRNO_MARKERS):
            ancestor = _existing_ancestor(target)
            free = shutil.disk_usage(ancestor).free if ancestor else None
            detail = text.strip().splitlines()[0][:120] if text.strip() else type(e).__name__
            if free is not None and free < _LOW_SPACE_BYTES:
                return (f'Cannot write {target}: the disk is full (ENOSPC; {free // 1024 // 1024} MB free; the '
                        f'writer said: {detail}). Free space there or choose another output location.')
            return (f'Cannot write {target}: the write failed ({detail}); the disk may be full or the location '
                    f'not writable ({"unknown" if free is None else free // 1024 // 1024} MB free). Free space '
                    f'there or choose another output location.')
    return None


def untouched_note(existing_output) -> str:
    """What the user keeps after a failed write (appended to the message)."""
    if existing_output is not None and os.path.lexists(os.fspath(existing_output)):
        return f' The temporary folder was removed; {os.fspath(existing_output)} is unchanged.'
    return ' The temporary folder was removed; nothing was written.'
