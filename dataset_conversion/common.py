"""Shared helpers for the dataset converters (LA, ACDC, BraTS2020, Pancreas-CT).

Every converter turns a downloaded release into an nnU-Net v2 raw dataset with this layout::

    <output>/DatasetXXX_Name/
        imagesTr/<ID>_0000.nii.gz  labelsTr/<ID>.nii.gz     labeled training cases only
        imagesUnlabeled/<ID>_0000.nii.gz                    rest of the training pool, images only
        imagesTs/<ID>_0000.nii.gz  labelsTs/<ID>.nii.gz     held-out test set
        dataset.json                                        numTraining = number of LABELED cases
        semiseg_split.json                                  manifest: IDs per subset + where they came from

Public API (stable; the converters of all four datasets import it):

- ``ConversionError``: the one exception a converter raises for bad input; ``main()`` turns it into exit code 2.
- ``build_parser(...)``: argparse parser with the options every converter shares.
- ``read_id_list(path)``, ``load_packaged_list(filename)``: read case-ID lists (user file / shipped with the package).
- ``resolve_split(...)`` -> ``SplitAssignment``: labeled / unlabeled / test IDs from a published (or user) list.
- ``DatasetWriter``: context manager that writes into a temporary folder and moves it into place at the end.
- ``write_nifti(...)``: numpy array + spacing -> NIfTI through SimpleITK.
- ``output_paths(...)``: where a case of a given role (labeled / unlabeled / test) goes.
- ``read_h5(...)``, ``check_same_geometry(...)``, ``check_label_values(...)``: input checks with good messages.
- ``write_dataset_json(...)``, ``write_split_manifest(...)``.
- ``parallel_map(...)``: multiprocessing map with a tqdm progress bar honouring ``-np``.
- ``run_main(...)``: shared ``main`` wrapper (prints ConversionError messages without a traceback).

Array/spacing convention used throughout: numpy arrays are in SimpleITK order (z, y, x); spacing, origin and
direction are in ITK/physical order (x, y, z). Converters whose source stores (x, y, z) arrays transpose first.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings, positive_int

SPLITS_PACKAGE = "dataset_conversion"
SPLITS_SUBDIR = "splits"
FILE_ENDING = ".nii.gz"
MANIFEST_NAME = "semiseg_split.json"

# Folder names of the raw layout (imagesUnlabeled is what nnunetv2_semiseg's unlabeled preprocessing reads).
IMAGES_TR, LABELS_TR = "imagesTr", "labelsTr"
IMAGES_UNLABELED = "imagesUnlabeled"
IMAGES_TS, LABELS_TS = "imagesTs", "labelsTs"

# Roles of a case in the output. Unlabeled cases get no label file anywhere in the output.
ROLE_LABELED, ROLE_UNLABELED, ROLE_TEST = "labeled", "unlabeled", "test"
_ROLE_FOLDERS = {ROLE_LABELED: (IMAGES_TR, LABELS_TR), ROLE_UNLABELED: (IMAGES_UNLABELED, None),
                 ROLE_TEST: (IMAGES_TS, LABELS_TS)}


class ConversionError(Exception):
    """Bad converter input. The message names the case or file and says how to fix it."""


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only for real defaults, not for None/False/flags."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str, default_dataset_id: int, default_name: str,
                 split_choices: Sequence[str], default_split: str, input_help: str) -> argparse.ArgumentParser:
    """Parser with the options shared by all converters. Converters may add their own options afterwards.

    Resulting attributes: input, dataset_id, name, output, overwrite, num_processes, labeled, labeled_list,
    train_list, test_list, only_present, write_found_lists, target_spacing, split.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path, help=input_help)
    p.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, default=default_dataset_id,
                   help="nnU-Net dataset ID (output folder DatasetXXX_<name>)")
    p.add_argument("--name", default=default_name, help="dataset name (output folder DatasetXXX_<name>)")
    p.add_argument("--output", type=Path, default=None,
                   help="nnU-Net raw folder to write into; default: $nnUNet_raw")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_<name> folder (only after the new one is complete)")
    p.add_argument("-np", "--num-processes", dest="num_processes", type=positive_int, default=1,
                   help="number of worker processes")
    p.add_argument("--split", choices=list(split_choices), default=default_split,
                   help="published split (training list + test list) to use")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--labeled", type=int, default=None, metavar="N",
                     help="labeled set = first N entries of the split's training list (the literature's "
                          "convention); default: all training cases labeled")
    lab.add_argument("--labeled-list", dest="labeled_list", type=Path, default=None, metavar="FILE",
                     help="labeled set = IDs in FILE (one per line); the rest of the training list is unlabeled")
    p.add_argument("--train-list", dest="train_list", type=Path, default=None, metavar="FILE",
                   help="replace the split's training list by FILE (e.g. when only part of a release is "
                        "downloaded); --labeled N then takes the first N lines of FILE")
    p.add_argument("--test-list", dest="test_list", type=Path, default=None, metavar="FILE",
                   help="replace the split's test list by FILE (may be empty)")
    p.add_argument("--only-present", dest="only_present", action="store_true",
                   help="drop list entries whose files are missing from the input instead of failing "
                        "(the dropped IDs are recorded in semiseg_split.json); the labeled set is chosen AFTER "
                        "dropping, so it can differ from the published protocol")
    p.add_argument("--write-found-lists", dest="write_found_lists", type=Path, default=None, metavar="DIR",
                   help="write the split's training and test lists reduced to the cases present in the input to "
                        "DIR/train.txt and DIR/test.txt (for --train-list/--test-list with a partial download), "
                        "also when cases are missing")
    p.add_argument("--target-spacing", dest="target_spacing", type=_spacing_value, nargs=3, default=None,
                   metavar=("X", "Y", "Z"),
                   help="resample every image and label to this spacing in mm (x y z; 'keep' leaves an axis as "
                        "it is) on the same physical extent: images linear, labels per class linear with the "
                        "largest value winning. For training at a coarser spacing than nnU-Net plans (e.g. on a "
                        "CPU); nnU-Net's own way is -overwrite_target_spacing at planning (README)")
    return p


def _spacing_value(text: str):
    if text.strip().lower() == "keep":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is no spacing: give a positive number of mm or 'keep'")
    return value


def resolve_output_root(output: Path | None) -> Path:
    """--output, falling back to $nnUNet_raw."""
    if output is not None:
        return Path(output)
    env = os.environ.get("nnUNet_raw")
    if not env:
        raise ConversionError("No output folder: pass --output FOLDER or set the environment variable nnUNet_raw "
                              "(export nnUNet_raw=/path/to/nnUNet_raw).")
    return Path(env)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"Dataset ID {dataset_id} is out of range: nnU-Net IDs are 1..999 (pass -d ID).")
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise ConversionError(f"Dataset name {name!r} is not usable as a folder name: pass --name without "
                              f"spaces or slashes.")
    return f"Dataset{dataset_id:03d}_{name}"


# ----------------------------------------------------------------------------------------------------------------
# ID lists
# ----------------------------------------------------------------------------------------------------------------
def parse_id_lines(text: str, source: str) -> list[str]:
    """One ID per line; blank lines and '#' comments ignored; duplicates are an error (order matters)."""
    ids: list[str] = []
    seen: set[str] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry in seen:
            raise ConversionError(f"{source}, line {line_no}: case ID {entry!r} appears twice; remove the "
                                  f"duplicate line.")
        seen.add(entry)
        ids.append(entry)
    return ids


def read_id_list(path: Path | str) -> list[str]:
    """Read a user-provided ID list file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"List file {path} does not exist: check the path given to the list option.")
    return parse_id_lines(path.read_text(), str(path))


def packaged_list_path(filename: str):
    return resources.files(SPLITS_PACKAGE).joinpath(SPLITS_SUBDIR, filename)


def load_packaged_list(filename: str) -> list[str]:
    """Read a split list shipped in dataset_conversion/splits/ (origins: splits/README.md)."""
    ref = packaged_list_path(filename)
    if not ref.is_file():
        raise ConversionError(f"Packaged split list {filename} not found in dataset_conversion/splits/: "
                              f"reinstall the package (pip install nnunetv2_semiseg).")
    return parse_id_lines(ref.read_text(), f"dataset_conversion/splits/{filename}")


@dataclass
class SplitAssignment:
    """Result of resolve_split. IDs are in list order. ``provenance`` goes verbatim into the manifest."""
    labeled: list[str]
    unlabeled: list[str]
    test: list[str]
    provenance: dict = field(default_factory=dict)


def resolve_split(train_ids: Sequence[str], test_ids: Sequence[str], *, train_source: str, test_source: str,
                  labeled_n: int | None = None, labeled_ids: Sequence[str] | None = None,
                  labeled_source: str | None = None, present: Iterable[str] | None = None,
                  only_present: bool = False, unit: str = "case", location_hint: str | None = None,
                  found_lists_dir: Path | None = None) -> SplitAssignment:
    """Split a training list into labeled/unlabeled and check the test list.

    labeled_n: first N of train_ids (literature convention). labeled_ids: explicit list (must be a subset of
    train_ids). Neither: everything labeled. ``present``: the IDs available in the input; list entries not present
    are an error, or are dropped (and recorded) when only_present is True. ``unit`` only changes the wording of
    messages (ACDC resolves patients, not frames). ``location_hint`` (e.g. "<root>/<ID>/mri_norm2.h5") tells the
    user where a missing case was looked for. ``found_lists_dir`` (--write-found-lists): the lists reduced to the
    present IDs are written there (train.txt, test.txt) before a missing case fails the run.
    """
    train_ids, test_ids = list(train_ids), list(test_ids)
    if labeled_ids is not None:
        # list mistakes first: they are the user's to fix whatever is downloaded
        check_labeled_in_train(labeled_ids, labeled_source, train_ids, train_source, test_ids, unit)
        if not labeled_ids:
            raise ConversionError(f"The labeled list {labeled_source} is empty; list at least one {unit}.")
    dropped: list[str] = []
    if present is not None:
        present = set(present)
        missing = [i for i in train_ids + test_ids if i not in present]
        found_note = ""
        if found_lists_dir is not None:
            found_note = write_found_lists(found_lists_dir, [i for i in train_ids if i in present],
                                           [i for i in test_ids if i in present], unit)
        if missing and not only_present:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ConversionError(
                f"{len(missing)} {unit}(s) of the split lists are missing from the input ({shown}; first from "
                f"{train_source if missing[0] in train_ids else test_source})"
                f"{'; expected ' + location_hint if location_hint else ''}. Fix: download the complete "
                f"release, or pass --train-list/--test-list with only the {unit}s you have, or --only-present."
                f"{' ' + found_note if found_note else ''}")
        dropped = missing
        train_ids = [i for i in train_ids if i in present]
        test_ids = [i for i in test_ids if i in present]

    overlap = sorted(set(train_ids) & set(test_ids))
    if overlap:
        raise ConversionError(f"{unit} {overlap[0]} is in both the training list ({train_source}) and the test "
                              f"list ({test_source}); remove it from one of them.")
    if not train_ids:
        raise ConversionError(f"The training list ({train_source}) is empty after checking the input; "
                              f"pass a --train-list with at least one {unit} present in the input.")

    if labeled_n is not None:
        if labeled_n < 1 or labeled_n > len(train_ids):
            raise ConversionError(f"--labeled {labeled_n} is out of range: the training list ({train_source}) "
                                  f"has {len(train_ids)} {unit}s; pass 1..{len(train_ids)}.")
        labeled = train_ids[:labeled_n]
        rule = f"first {labeled_n} {unit}s of the training list"
    elif labeled_ids is not None:
        wanted = set(labeled_ids)
        labeled = [i for i in train_ids if i in wanted]  # keep training-list order; --only-present may drop some
        if not labeled:
            raise ConversionError(f"None of the {unit}s in the labeled list {labeled_source} is present in the "
                                  f"input; download them or pass another --labeled-list.")
        rule = f"{unit}s listed in {labeled_source}"
    else:
        labeled = list(train_ids)
        rule = f"all {unit}s of the training list (fully supervised)"
    labeled_set = set(labeled)
    unlabeled = [i for i in train_ids if i not in labeled_set]
    provenance = {"train_list": train_source, "test_list": test_source, "labeled_rule": rule,
                  "dropped_missing_from_input": dropped}
    return SplitAssignment(labeled, unlabeled, test_ids, provenance)


def write_found_lists(folder: Path | str, train_ids: Sequence[str], test_ids: Sequence[str], unit: str = "case"
                      ) -> str:
    """Write ``folder/train.txt`` and ``folder/test.txt`` (one ID per line, list order kept); returns a one-line note
    saying how to use them. Each file is written under a temporary name and renamed, so an existing list is only
    replaced by a complete one."""
    from nnunetv2_semiseg.utilities.write_errors import describe_write_failure
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, ids in (("train.txt", train_ids), ("test.txt", test_ids)):
            tmp = folder / f".{name}.tmp{os.getpid()}"
            tmp.write_text("".join(f"{i}\n" for i in ids))
            os.replace(tmp, folder / name)
    except OSError as e:
        raise ConversionError(describe_write_failure(e, folder) or f"Cannot write the found lists to {folder}: {e}"
                              ) from None
    note = (f"The lists of the {unit}s present were written to {folder}/train.txt ({len(train_ids)}) and "
            f"{folder}/test.txt ({len(test_ids)}): pass --train_list {folder}/train.txt --test_list "
            f"{folder}/test.txt.")
    print(note, file=sys.stderr)
    return note


def check_ids_known(ids: Iterable[str], known: Iterable[str], source: str, unit: str = "case") -> None:
    """Error naming the first ID of ``source`` that is not in ``known``."""
    known = set(known)
    for i in ids:
        if i not in known:
            raise ConversionError(f"Unknown {unit} ID {i!r} in {source}: no such {unit} in this dataset's "
                                  f"ID scheme. Fix the list (IDs look like {sorted(known)[0]!r}).")


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------
class DatasetWriter:
    """Write a raw dataset atomically.

    ``with DatasetWriter(root, 'Dataset101_LA', overwrite) as w:`` creates ``root/.tmp_Dataset101_LA_<random>/``
    (same file system as the target, so the final move is a rename). Write through ``w.path(...)``/``w.tmp``.
    On success the folder is moved to ``root/Dataset101_LA`` (an existing one is replaced only then, when
    overwrite is set); on any exception the temporary folder is removed and an existing dataset is untouched.
    """

    TEMP_PREFIX, OLD_PREFIX = ".tmp_", ".old_"

    def __init__(self, output_root: Path, folder_name: str, overwrite: bool = False,
                 subfolders: Sequence[str] = (IMAGES_TR, LABELS_TR, IMAGES_UNLABELED, IMAGES_TS, LABELS_TS),
                 inputs: Sequence = (), target_spacing: Sequence | None = None):
        """``inputs``: folders the conversion reads (``-i``); the target must not be, contain or lie in one.
        ``target_spacing`` (x, y, z mm, None = keep an axis): every written file is resampled to it before the
        folder is moved into place (``--target-spacing``)."""
        self.inputs = tuple(inputs)
        self.target_spacing = None if target_spacing is None or all(v is None for v in target_spacing) \
            else tuple(target_spacing)
        self.root = Path(output_root)
        self.folder_name = folder_name
        self.target = self.root / folder_name
        self.overwrite = overwrite
        self.subfolders = tuple(subfolders)
        self.tmp: Path | None = None

    def check_target(self) -> None:
        """Fail early (before any conversion work) if the target cannot be written."""
        from nnunetv2_semiseg.utilities.safe_io import UnsafeOutputError, check_output_location
        try:
            check_output_location(self.target, self.inputs, what="output dataset folder", allow_inside=True)
        except UnsafeOutputError as e:
            raise ConversionError(f"{e} Pass another --output or -d/--name.") from None
        if os.path.lexists(self.target) and not self.overwrite:
            raise ConversionError(f"Output dataset {self.target} already exists; pass --overwrite to replace it "
                                  f"or choose another -d/--name.")
        if os.path.lexists(self.target) and (self.target.is_symlink() or not (self.target / "dataset.json").is_file()):
            raise ConversionError(f"{self.target} exists but is not an nnU-Net raw dataset (no dataset.json): "
                                  f"--overwrite only replaces a dataset folder. Choose another -d/--name, or move "
                                  f"that folder away yourself.")
        # nnU-Net resolves datasets by ID: two folders DatasetXXX_* with the same ID break every nnU-Net command.
        prefix = self.folder_name.split("_", 1)[0] + "_"
        if self.root.is_dir():
            for other in sorted(self.root.iterdir()):
                if other.name.startswith(prefix) and other.name != self.folder_name and other.is_dir():
                    raise ConversionError(f"{other} already uses the dataset ID of {self.folder_name}; nnU-Net "
                                          f"needs unique IDs. Choose another -d or remove that folder.")

    def __enter__(self) -> "DatasetWriter":
        from nnunetv2_semiseg.utilities import safe_io
        self.check_target()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Leftovers of killed conversions of this dataset whose process is gone (a live run's are kept).
            safe_io.remove_stale_temp_dirs(self.root, (f"{self.TEMP_PREFIX}{self.folder_name}_",
                                                       f"{self.OLD_PREFIX}{self.folder_name}_"))
            self.tmp = Path(safe_io.make_temp_dir(self.root, f"{self.TEMP_PREFIX}{self.folder_name}_"))
            for sub in self.subfolders:
                (self.tmp / sub).mkdir()
        except OSError as e:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_write_failure(e)
            raise
        return self

    def _raise_if_write_failure(self, error: BaseException) -> None:
        # SimpleITK on a full disk says 'NWAD: wrote only 0 of ...': name the path and the cause instead.
        from nnunetv2_semiseg.utilities.write_errors import describe_write_failure, untouched_note
        if not isinstance(error, Exception) or isinstance(error, ConversionError):
            return
        message = describe_write_failure(error, self.target)
        if message:
            raise ConversionError(message + untouched_note(self.target)) from None

    def path(self, *parts: str) -> Path:
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        return self.tmp.joinpath(*parts)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_write_failure(exc)
            return False
        try:
            self._commit()
        except BaseException as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._raise_if_write_failure(e)
            raise
        return False

    def _commit(self) -> None:
        from nnunetv2_semiseg.utilities import safe_io
        if self.target_spacing is not None:
            from dataset_conversion.resample import resample_dataset_folder
            shown = " x ".join("native" if v is None else f"{v:g}" for v in self.target_spacing)
            print(f"Resampling to {shown} mm (x y z) ...", flush=True)
            count = resample_dataset_folder(self.tmp, self.target_spacing)
            print(f"Resampled {count} files.", flush=True)
        safe_io.finish_temp_dir(self.tmp)  # mkdtemp's 0700 would survive the rename: follow the umask
        backup = None
        if self.target.exists():
            if not self.overwrite:  # appeared while we were converting
                raise ConversionError(f"Output dataset {self.target} appeared during the conversion; pass "
                                      f"--overwrite to replace it.")
            # os.replace cannot replace a non-empty directory: move the old one aside first, delete it last.
            backup = self.root / safe_io.owned_name(f"{self.OLD_PREFIX}{self.folder_name}_")
            os.replace(self.target, backup)
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            if backup is not None:
                os.replace(backup, self.target)
            raise
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


def output_paths(dataset_folder: Path | str, role: str, case_id: str, channel: int = 0
                 ) -> tuple[Path, Path | None]:
    """(image path, label path or None) of a case in the raw layout; label is None for unlabeled cases."""
    image_dir, label_dir = _ROLE_FOLDERS[role]
    folder = Path(dataset_folder)
    image = folder / image_dir / f"{case_id}_{channel:04d}{FILE_ENDING}"
    label = folder / label_dir / f"{case_id}{FILE_ENDING}" if label_dir else None
    return image, label


def read_h5(path: Path | str, required_keys: Sequence[str], case_id: str,
            release: str = "the expected h5 release") -> dict:
    """Read datasets ``required_keys`` from an h5 file; missing/unreadable file or wrong keys -> ConversionError."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"Case {case_id}: file {path} is missing; re-download it from {release}.")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            missing = [k for k in required_keys if k not in f]
            if missing:
                raise ConversionError(
                    f"Case {case_id}: {path} has keys {keys}, expected {list(required_keys)} (missing "
                    f"{missing}). Is this file from {release}? Re-download it or pick the right --format.")
            return {k: np.asarray(f[k][()]) for k in required_keys}
    except OSError as e:
        raise ConversionError(f"Case {case_id}: cannot read {path} as HDF5 ({e}); the file is corrupt or "
                              f"truncated, re-download it.") from None


def check_same_geometry(case_id: str, image_file, label_file, image_shape, label_shape,
                        image_spacing=None, label_spacing=None, rtol: float = 1e-3) -> None:
    """Image and label must share shape (and spacing when known): nnU-Net refuses mismatches later anyway,
    with a far less helpful message."""
    if tuple(image_shape) != tuple(label_shape):
        raise ConversionError(f"Case {case_id}: image {image_file} has shape {tuple(image_shape)} but label "
                              f"{label_file} has shape {tuple(label_shape)}; they must match voxel for voxel. "
                              f"Re-export the pair or exclude the case from the lists.")
    if image_spacing is not None and label_spacing is not None:
        if not np.allclose(image_spacing, label_spacing, rtol=rtol, atol=1e-5):
            raise ConversionError(f"Case {case_id}: image {image_file} has spacing {tuple(image_spacing)} but "
                                  f"label {label_file} has spacing {tuple(label_spacing)}; fix the header of one "
                                  f"of them or exclude the case from the lists.")


def check_label_values(case_id: str, label_file, label: np.ndarray, allowed: Iterable[int]) -> list[int]:
    """Return the sorted label values; values outside ``allowed`` -> ConversionError.

    Values are checked as stored: a float label with 0.5 is an error, not background (int() would truncate it).
    """
    stored = np.unique(label)
    if not (np.issubdtype(stored.dtype, np.integer) or np.issubdtype(stored.dtype, np.bool_)):
        fractional = [float(v) for v in stored if not np.isfinite(v) or float(v) != round(float(v))]
        if fractional:
            shown = ", ".join(f"{v:g}" for v in fractional[:5]) + (" ..." if len(fractional) > 5 else "")
            raise ConversionError(f"Case {case_id}: label {label_file} contains non-integer values ({shown}), "
                                  f"expected only {sorted(allowed)}; it is not a label map (a probability or "
                                  f"resampled map?). Re-export it as integers or exclude the case.")
    values = [int(v) for v in stored]
    bad = sorted(set(values) - set(int(a) for a in allowed))
    if bad:
        raise ConversionError(f"Case {case_id}: label {label_file} contains values {bad}, expected only "
                              f"{sorted(allowed)}; the file is not a label map of this dataset.")
    return values


def check_image_integrity(path, case_id: str) -> None:
    """A truncated/corrupt NIfTI input -> ConversionError (SimpleITK would fill the missing part with zeros)."""
    from nnunetv2_semiseg.utilities.safe_io import CorruptImageError, check_image_file
    try:
        check_image_file(path)
    except CorruptImageError as e:
        raise ConversionError(f"Case {case_id}: {e} Re-download it or exclude the case from the lists.") from None


def check_finite_voxels(image, case_id: str, source) -> None:
    """Refuse NaN / Inf voxels (h5 and NRRD keep them): nnU-Net's normalisation would turn the whole case into NaN
    and training would diverge. ``image``: numpy array or SimpleITK image. Same counts as the unlabeled
    preprocessing's check (``nnunetv2_semiseg.data.preprocess_unlabeled.count_non_finite_array``)."""
    from nnunetv2_semiseg.data.preprocess_unlabeled import count_non_finite_array
    if not isinstance(image, np.ndarray):
        import SimpleITK as sitk
        image = sitk.GetArrayViewFromImage(image)
    counts = count_non_finite_array(image)
    if counts is None or counts[0] + counts[1] == 0:
        return
    nan, inf, total = counts
    raise ConversionError(f"Case {case_id}: {source} holds {nan + inf} non-finite voxel(s) of {total} ({nan} NaN, "
                          f"{inf} Inf); nnU-Net's normalisation would make the whole case NaN. Replace them in the "
                          f"source (e.g. with the background value) or exclude the case from the lists.")


# A case's spacing is "far" from the labeled cases' when it lies outside [smallest / 2, largest * 2] on some axis
# (same rule as nnunetv2_semiseg's unlabeled preprocessing): the usual scanner spread passes, a wrong header does not.
SPACING_FACTOR = 2.0


def spacing_outlier_warnings(spacings: dict, labeled: Iterable[str], factor: float = SPACING_FACTOR) -> list[str]:
    """Warnings (printed to stderr and returned) for cases whose spacing is far from the labeled cases'.

    ``spacings``: {case ID: spacing (x, y, z)} of every converted case; ``labeled``: the labeled case IDs. nnU-Net
    resamples every case to one target spacing, so such a case is silently stretched: most often a wrong header.
    """
    reference = [tuple(spacings[c]) for c in labeled if c in spacings]
    if not reference:
        return []
    low = [min(r[a] for r in reference) for a in range(len(reference[0]))]
    high = [max(r[a] for r in reference) for a in range(len(reference[0]))]
    warnings = []
    for case, spacing in spacings.items():
        if any(not (lo / factor <= s <= hi * factor) for s, lo, hi in zip(spacing, low, high)):
            warnings.append(f"Case {case}: spacing (x, y, z) {tuple(round(float(s), 4) for s in spacing)} is far from "
                            f"the labeled cases' ({tuple(round(v, 4) for v in low)} .. "
                            f"{tuple(round(v, 4) for v in high)}); nnU-Net will resample it to one target spacing. "
                            f"Check its header (or --h5-spacing) if this is not intended.")
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    return warnings


def write_nifti(array_zyx: np.ndarray, path: Path | str, spacing_xyz: Sequence[float],
                origin_xyz: Sequence[float] | None = None, direction: Sequence[float] | None = None) -> None:
    """Write a 3D numpy array (SimpleITK order z, y, x) as NIfTI with the given physical geometry."""
    import SimpleITK as sitk  # imported lazily: keeps `--help` fast

    if array_zyx.ndim != 3:
        raise ValueError(f"write_nifti expects a 3D array, got shape {array_zyx.shape} for {path}")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetSpacing([float(s) for s in spacing_xyz])
    if origin_xyz is not None:
        img.SetOrigin([float(o) for o in origin_xyz])
    if direction is not None:
        img.SetDirection([float(d) for d in direction])
    sitk.WriteImage(img, str(path), useCompression=True)


def write_json(obj, path: Path | str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_dataset_json(folder: Path, channel_names: dict, labels: dict, num_training: int,
                       file_ending: str = FILE_ENDING, **extra) -> dict:
    """nnU-Net v2 dataset.json. numTraining counts LABELED cases only (imagesTr); extra keys are kept verbatim.

    channel_names: {0: 'noNorm'} etc. -- the name selects nnU-Net's normalisation ('CT', 'noNorm',
    'rescale_to_0_1', anything else -> z-score).
    """
    values = sorted(labels.values())
    if values != list(range(len(values))):
        raise ValueError(f"labels must be consecutive integers from 0, got {labels}")
    data = {"channel_names": {str(k): v for k, v in channel_names.items()},
            "labels": dict(labels),
            "numTraining": int(num_training),
            "file_ending": file_ending}
    data.update(extra)
    write_json(data, Path(folder) / "dataset.json")
    return data


def write_split_manifest(folder: Path, *, dataset: str, converter: str, source_format: str, input_folder: Path,
                         split_name: str, assignment: SplitAssignment, options: dict, extra: dict | None = None
                         ) -> dict:
    """semiseg_split.json: which case is labeled / unlabeled / test and which list it came from."""
    data = {
        "dataset": dataset,
        "converter": converter,
        "source_format": source_format,
        "input_folder": str(Path(input_folder).resolve()),
        "split": split_name,
        **assignment.provenance,
        "labeled": list(assignment.labeled),
        "unlabeled": list(assignment.unlabeled),
        "test": list(assignment.test),
        "num_labeled": len(assignment.labeled),
        "num_unlabeled": len(assignment.unlabeled),
        "num_test": len(assignment.test),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
    }
    if extra:
        data.update(extra)
    write_json(data, Path(folder) / MANIFEST_NAME)
    return data


# ----------------------------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------------------------
def parallel_map(func: Callable, items: Sequence, num_processes: int = 1, desc: str = "converting") -> list:
    """map(func, items) with a progress bar; results in input order. num_processes <= 1 runs in this process
    (simpler tracebacks, no fork cost for tiny datasets). ``func`` must be picklable (module-level) for > 1."""
    from tqdm import tqdm

    items = list(items)
    if num_processes <= 1 or len(items) <= 1:
        return [func(x) for x in tqdm(items, desc=desc, unit="case", disable=None)]
    from nnunetv2_semiseg.utilities.safe_io import exit_with_parent
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    # Workers die with this process: a killed conversion must not keep writing into its temporary folder.
    with ctx.Pool(min(num_processes, len(items)), initializer=exit_with_parent,
                  initargs=(os.getpid(),)) as pool:
        return list(tqdm(pool.imap(func, items), total=len(items), desc=desc, unit="case", disable=None))


def run_main(convert: Callable[[argparse.Namespace], Path], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None) -> int:
    """Parse argv, run ``convert(args)``; print ConversionError messages (no traceback) and return 2 for them."""
    args = accept_underscore_spellings(parser).parse_args(argv)
    try:
        target = convert(args)
    except ConversionError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {target}")
    return 0


def check_labeled_in_train(labeled_ids: Sequence[str], labeled_source: str, train_ids: Sequence[str],
                           train_source: str, test_ids: Sequence[str] = (), unit: str = "case") -> None:
    """Reject a labeled-list entry that is not in the training list, BEFORE presence checks: the user then hears
    about the wrong list entry rather than about unrelated cases missing from a partial download.
    (Added for the BraTS2020 / Pancreas converters; resolve_split repeats the check after presence filtering.)"""
    train_set, test_set = set(train_ids), set(test_ids)
    for i in labeled_ids:
        if i not in train_set:
            where = " (it is in the test list)" if i in test_set else ""
            raise ConversionError(f"Unknown {unit} ID {i!r} in the labeled list {labeled_source}: it is not in the "
                                  f"training list {train_source}{where}. Fix the labeled list or pass a matching "
                                  f"--train-list.")
