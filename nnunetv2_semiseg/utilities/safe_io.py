"""File-level safety rules shared by every command that writes a folder or reads raw images.

- :func:`check_output_location`: an output folder must not be an input, lie inside one or contain one (a
  ``--overwrite`` would otherwise delete the input).
- :func:`make_temp_dir` / :func:`remove_stale_temp_dirs`: commands write into a temporary folder next to the
  target and rename it into place. The folder's name records its owner (process id and host) so that a later run
  can remove the leftovers of a killed run, and never the folder of a run that is still alive.
- :func:`apply_umask`: ``mkdtemp`` creates folders with mode 0700 and ``mkstemp`` files with 0600, and a rename
  keeps the mode; this restores what a plain ``mkdir``/``open`` would have given under the user's umask.
- :func:`exit_with_parent`: a worker-pool initializer so that workers stop when the main process is killed.
- :func:`check_image_file`: a truncated or corrupt NIfTI file is detected before it is read (SimpleITK silently
  fills the missing part with zeros).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import threading
import uuid
import zlib
from typing import Iterable, List, Optional



class UnsafeOutputError(RuntimeError):
    """The output location would overwrite or delete an input. The message names both and the fix."""


class CorruptImageError(RuntimeError):
    """An image file is truncated or corrupt. The message names the file."""


# ---------------------------------------------------------------------------------------------- output targets
def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _is_within(inner: str, outer: str) -> bool:
    return os.path.commonpath([inner, outer]) == outer


def check_output_location(output, inputs: Iterable, what: str = 'output', allow_inside: bool = False) -> None:
    """Raise :class:`UnsafeOutputError` if ``output`` is one of ``inputs``, lies inside one or contains one.

    ``allow_inside``: an output inside an input is accepted (converters: the raw folder may sit below the download
    folder; replacing the output then deletes none of the input, which the other two cases would).
    Paths are compared after resolving symbolic links, so a link to the input is caught as well.
    """
    out = _real(output)
    for source in inputs:
        if source is None:
            continue
        src = _real(source)
        if out == src:
            relation = 'is'
        elif _is_within(out, src):
            if allow_inside:
                continue
            relation = 'lies inside'
        elif _is_within(src, out):
            relation = 'contains'
        else:
            continue
        raise UnsafeOutputError(
            f"The {what} {output} {relation} the input {source}: writing (or --overwrite) there would destroy the "
            f"input. Choose another {what}.")


# --------------------------------------------------------------------------------------------- temp folders
def current_umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, is_dir: Optional[bool] = None) -> None:
    """Give ``path`` the mode a plain mkdir (0777) / open (0666) would have under the current umask."""
    path = os.fspath(path)
    if is_dir is None:
        is_dir = os.path.isdir(path)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def _host_tag() -> str:
    # Short and file-name safe; the host matters because pids mean nothing across machines on a shared disk.
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owned_name(prefix: str, pid: Optional[int] = None) -> str:
    """``<prefix><pid>.<host>.<random>``: a folder name that says which process owns it.

    The owner is in the name, not in a file inside, so there is no moment at which the folder exists without it
    (a run killed right after creating the folder leaves a folder that the next run can still judge).
    """
    return f'{prefix}{os.getpid() if pid is None else pid}.{_host_tag()}.{uuid.uuid4().hex[:8]}'


def make_temp_dir(parent, prefix: str) -> str:
    """Create ``parent/<prefix><pid>.<host>.<random>`` (mode 0700 until :func:`finish_temp_dir`)."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f'{prefix}{os.getpid()}.{_host_tag()}.', dir=os.fspath(parent))


def finish_temp_dir(path) -> None:
    """Before the rename into place: give the folder the mode a plain mkdir would have under the umask."""
    apply_umask(path, is_dir=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_is_dead(name: str, prefix: str) -> bool:
    """True only when ``name`` (made by :func:`owned_name`/:func:`make_temp_dir` with ``prefix``) belongs to a
    process of this host that no longer exists. Names without an owner are never judged dead."""
    if not name.startswith(prefix):
        return False
    parts = name[len(prefix):].split('.', 2)
    if len(parts) != 3 or not parts[0].isdigit():
        return False
    pid, host = int(parts[0]), parts[1]
    if host != _host_tag():
        return False  # another machine on a shared file system
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temp_dirs(parent, prefixes: Iterable[str]) -> List[str]:
    """Remove folders ``parent/<prefix>*`` left by killed runs (owner process dead). Returns the removed paths."""
    parent = os.fspath(parent)
    if not os.path.isdir(parent):
        return []
    prefixes = tuple(prefixes)
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path) and any(owner_is_dead(name, p) for p in prefixes):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------- workers
def _watch_parent(parent_pid: int) -> None:
    import time
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.2)


def exit_with_parent(parent_pid: Optional[int] = None) -> None:
    """Pool initializer: the worker dies with the process that started it.

    Pass ``initializer=exit_with_parent, initargs=(os.getpid(),)``. On Linux the kernel sends SIGKILL when the parent
    dies (prctl PR_SET_PDEATHSIG); everywhere a daemon thread also watches for the worker being re-parented.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith('linux'):
        try:
            import ctypes
            import signal
            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:  # no libc/prctl: the watcher thread below still works
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


# --------------------------------------------------------------------------------------------- image files
def _nifti_expected_bytes(path: str) -> Optional[int]:
    """Header offset + data size that a complete NIfTI file holds, from its header (nibabel)."""
    import nibabel
    import numpy as np
    try:
        header = nibabel.load(path).header
    except Exception as e:  # nibabel raises several types for bad headers
        raise CorruptImageError(f'{path}: not a readable NIfTI file ({type(e).__name__}: {e}). Re-copy or '
                                f're-export it.') from None
    shape = header.get_data_shape()
    itemsize = header.get_data_dtype().itemsize
    # Some writers (SimpleITK) leave vox_offset at 0; a single-file NIfTI's data never starts before the header's end.
    offset = max(int(header.get_data_offset()), int(getattr(header, 'single_vox_offset', 0)))
    return offset + int(np.prod(shape, dtype=np.int64)) * itemsize


def check_image_file(path) -> None:
    """Raise :class:`CorruptImageError` if a ``.nii``/``.nii.gz`` file is truncated or its gzip stream corrupt.

    ``.nii.gz``: the whole gzip stream is decompressed (its length and CRC are checked by gzip) and its length
    compared with what the header announces. ``.nii``: the file size is compared. Other formats are left to their
    reader.
    """
    path = os.fspath(path)
    lower = path.lower()
    if not (lower.endswith('.nii.gz') or lower.endswith('.nii')):
        return
    fix = 'The file is incomplete (interrupted copy or download?): copy or export it again.'
    if lower.endswith('.nii.gz'):
        size = 0
        try:
            with gzip.open(path, 'rb') as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    size += len(chunk)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            raise CorruptImageError(f'{path} is truncated or corrupt ({type(e).__name__}: {e}). {fix}') from None
    else:
        size = os.path.getsize(path)
    expected = _nifti_expected_bytes(path)
    if size < expected:
        raise CorruptImageError(f'{path} is truncated: its header announces {expected} bytes, the file holds '
                                f'{size}. {fix}')


def image_dimension(path) -> Optional[int]:
    """Number of spatial dimensions in the file's header (SimpleITK), or None if SimpleITK cannot tell."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetDimension()


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointReadError(RuntimeError):
    """A checkpoint file cannot be read. The message names the file and what to do instead."""


def other_checkpoints(path) -> List[str]:
    """The other ``checkpoint_*.pth`` files next to ``path`` (candidates to continue or export from)."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if f.startswith('checkpoint') and f.endswith('.pth') and f != name)


def load_torch_checkpoint(path, map_location, what_to_do: str) -> dict:
    """``torch.load`` whose error names the file: torch alone says 'failed finding central directory' (truncated
    zip) or 'Ran out of input' (empty file) without the path. ``what_to_do`` is appended to the message."""
    import pickle
    import torch
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        others = other_checkpoints(path)
        present = f" Other checkpoints in that folder: {', '.join(others)}." if others else ''
        raise CheckpointReadError(
            f'Checkpoint {path} is truncated, empty or corrupt ({type(e).__name__}: {str(e).strip()[:160]}).'
            f'{present} {what_to_do}') from None
