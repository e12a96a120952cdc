"""DICOM series reading and label-to-image geometry alignment (used by the Pancreas-CT converter).

The TCIA download stores one CT series per patient somewhere below `PANCREAS_XXXX/` (study and series folders in
between), while the NIH labels are separate NIfTI files whose header geometry is not guaranteed to match the DICOM
geometry. This module hides both problems behind two functions:

- `read_dicom_series(case_folder)`: find the single series below a folder with GDCM's series-ID lookup and read it
  with SimpleITK's series reader (which sorts slices by position and applies RescaleSlope/Intercept, so the voxel
  values are Hounsfield units).
- `align_label_to_image(label, image, ...)`: bring a label volume onto the image grid, either physically
  (reorienting by the direction matrices, then requiring the grids to coincide) or voxel-wise (trusting the array
  correspondence and copying the image geometry), and explain mismatches instead of silently resampling.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import ConversionError

DICOM_SUFFIXES = ('.dcm', '.DCM', '.dicom')


def find_dicom_folders(case_folder: str) -> List[str]:
    """All folders below `case_folder` (itself included) that directly contain DICOM files."""
    found = []
    for root, _dirs, files in os.walk(case_folder):
        if any(f.endswith(DICOM_SUFFIXES) for f in files):
            found.append(root)
    return sorted(found)


def read_dicom_series(case_folder: str, case_id: str) -> sitk.Image:
    """Read the one CT series stored below `case_folder` (any depth) as a 3D SimpleITK image in HU.

    Raises ConversionError when no series or more than one series is found, so that a case is never converted
    from an arbitrary pick among several series.
    """
    if not os.path.isdir(case_folder):
        raise ConversionError(f'case {case_id}: DICOM folder {case_folder} does not exist. '
                              f'Check -i (it must contain PANCREAS_XXXX folders from the TCIA download).')
    series: List[Tuple[str, str]] = []  # (folder, series UID)
    for folder in find_dicom_folders(case_folder):
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
            series.append((folder, uid))
    if not series:
        raise ConversionError(f'case {case_id}: no readable DICOM series (*.dcm) below {case_folder}. '
                              f'Re-download the case from TCIA or remove it from the case lists.')
    if len(series) > 1:
        listing = ', '.join(f'{os.path.relpath(f, case_folder)} [{uid}]' for f, uid in series)
        raise ConversionError(f'case {case_id}: {len(series)} DICOM series found below {case_folder} ({listing}); '
                              f'expected exactly one CT series. Move the extra series out of the case folder.')
    folder, uid = series[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    if len(files) < 2:
        raise ConversionError(f'case {case_id}: series {uid} in {folder} has {len(files)} slice(s); a 3D CT series '
                              f'needs several. Re-download the case.')
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as e:  # corrupt or truncated file
        raise ConversionError(f'case {case_id}: reading DICOM series in {folder} failed ({e}). '
                              f'Re-download the case.') from e
    return image


def _orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _grids_coincide(a: sitk.Image, b: sitk.Image, spacing_rtol: float, origin_tol_voxels: float) -> Tuple[bool, str]:
    """Same size, spacing (relative tolerance) and origin (within a fraction of a voxel)."""
    if a.GetSize() != b.GetSize():
        return False, f'size {b.GetSize()} vs image {a.GetSize()}'
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=spacing_rtol, atol=0):
        return False, f'spacing {tuple(round(s, 4) for s in b.GetSpacing())} vs image ' \
                      f'{tuple(round(s, 4) for s in a.GetSpacing())}'
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-3):
        return False, 'direction cosines differ'
    offset = np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin()))
    if np.any(offset > origin_tol_voxels * np.array(a.GetSpacing())):
        return False, f'origin {tuple(round(o, 2) for o in b.GetOrigin())} vs image ' \
                      f'{tuple(round(o, 2) for o in a.GetOrigin())}'
    return True, ''


def align_label_to_image(label: sitk.Image, image: sitk.Image, case_id: str, label_file: str,
                         mode: str = 'physical', spacing_rtol: float = 1e-3,
                         origin_tol_voxels: float = 0.5) -> Tuple[sitk.Image, str]:
    """Return (label on the image grid, note). `note` is '' when nothing had to be fixed.

    mode 'physical': the label header is trusted. If its axis order/flips differ from the image's, the label is
    reoriented (a pure axis permutation/flip, no interpolation); then size, spacing and origin must match the image.
    mode 'voxel': the label array is trusted to correspond voxel by voxel to the image array (what several
    literature pipelines do with the NIH labels, copying the image or label header across); only the size and the
    spacing (in the label's own axis order) must match.
    In both modes the returned label carries the image's exact geometry, so nnU-Net sees identical headers.
    """
    fix_hint = ("Check that the label belongs to this case; if the header is wrong but the voxels line up with the "
                "DICOM slices, rerun with --label-geometry voxel" if mode == 'physical' else
                "Check that the label belongs to this case")
    note = ''
    if mode == 'physical':
        img_code, lab_code = _orientation_code(image), _orientation_code(label)
        if img_code != lab_code:
            label = sitk.DICOMOrient(label, img_code)
            note = f'label reoriented {lab_code} -> {img_code}'
        ok, why = _grids_coincide(image, label, spacing_rtol, origin_tol_voxels)
        if not ok:
            raise ConversionError(f'case {case_id}: label {label_file} does not lie on the image grid ({why}). '
                                  f'{fix_hint}.')
    elif mode == 'voxel':
        if label.GetSize() != image.GetSize():
            raise ConversionError(f'case {case_id}: label {label_file} has shape {label.GetSize()} but the image has '
                                  f'{image.GetSize()} (x, y, z). {fix_hint}.')
        if not np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=spacing_rtol, atol=0):
            raise ConversionError(f'case {case_id}: label {label_file} spacing {label.GetSpacing()} differs from '
                                  f'the image spacing {image.GetSpacing()}. {fix_hint}.')
        if not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-3) or not np.allclose(
                label.GetOrigin(), image.GetOrigin(), atol=origin_tol_voxels * min(image.GetSpacing())):
            note = 'label header replaced by the image geometry (voxel mode)'
    else:
        raise ValueError(f'unknown label geometry mode {mode!r}')
    aligned = sitk.GetImageFromArray(sitk.GetArrayFromImage(label))
    aligned.CopyInformation(image)
    return aligned, note
