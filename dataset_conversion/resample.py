"""Resampling a converted raw dataset to one target spacing (``--target-spacing`` of every converter).

nnU-Net resamples every case to the plans' target spacing itself; a user who wants to train at a coarser spacing
than nnU-Net would pick (e.g. LA at 2.5 mm on a CPU) can either write the raw data at that spacing with
``--target-spacing`` (what the package's benchmarks do), or keep the native data and plan with
``nnUNetv2_plan_experiment -overwrite_target_spacing ... -overwrite_plans_name ...`` (README, "Training at a
coarser spacing"). The two are not bit-identical: nnU-Net resamples images with third-order splines and labels
per class with linear interpolation; here images are linear and labels per-class linear with the largest value
winning.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from dataset_conversion.common import FILE_ENDING, IMAGES_TR, IMAGES_TS, IMAGES_UNLABELED, LABELS_TR, LABELS_TS

LABEL_FOLDERS = (LABELS_TR, LABELS_TS)
IMAGE_FOLDERS = (IMAGES_TR, IMAGES_UNLABELED, IMAGES_TS)


def resample_file(src: str, dst: str, is_label: bool, spacing_xyz: Sequence[Optional[float]],
                  num_classes: int = 2) -> None:
    """Resample a NIfTI file to ``spacing_xyz`` (mm; None for an axis = keep it) on the same physical extent.

    Images: linear interpolation. Labels: linear interpolation of each class's mask, the class with the largest
    interpolated value wins (ties go to the higher class). For a binary label that is the mask interpolated and
    thresholded at 0.5 (smoother than nearest neighbour at a 4x step); the same rule for training and test labels.
    """
    import numpy as np
    import SimpleITK as sitk
    img = sitk.ReadImage(src)
    target = [sp if t is None else float(t) for t, sp in zip(spacing_xyz, img.GetSpacing())]
    size = [max(1, int(round(sz * sp / t))) for sz, sp, t in zip(img.GetSize(), img.GetSpacing(), target)]
    # keep the physical centre of the first voxel's cell: origin shifts by half the spacing change
    direction = np.array(img.GetDirection()).reshape(3, 3)
    half_step = np.array([(t - sp) / 2.0 for t, sp in zip(target, img.GetSpacing())])
    origin = [float(o + d) for o, d in zip(img.GetOrigin(), direction @ half_step)]
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing(target)
    resampler.SetSize(size)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(img.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0)
    if is_label and num_classes <= 2:
        out = resampler.Execute(sitk.Cast(img, sitk.sitkFloat32))
        out = sitk.Cast(out >= 0.5, sitk.sitkUInt8)
    elif is_label:
        label = sitk.GetArrayFromImage(img)
        masks = []
        for c in range(1, num_classes):
            mask = sitk.GetImageFromArray((label == c).astype(np.float32))
            mask.CopyInformation(img)
            masks.append(sitk.GetArrayFromImage(resampler.Execute(mask)))
        fg = np.stack(masks)
        scores = np.concatenate([1.0 - fg.sum(0, keepdims=True), fg])
        # argmax with ties to the higher class: search the reversed class axis
        winner = (num_classes - 1 - np.argmax(scores[::-1], axis=0)).astype(np.uint8)
        out = sitk.GetImageFromArray(winner)
        out.SetSpacing(target)
        out.SetOrigin(origin)
        out.SetDirection(img.GetDirection())
    else:
        out = resampler.Execute(sitk.Cast(img, sitk.sitkFloat32))
    sitk.WriteImage(out, dst, useCompression=True)


def num_label_classes(dataset_json: dict) -> int:
    """Largest integer label value in dataset.json's ``labels`` (regions list their member labels) + 1."""
    values = []
    for value in dataset_json["labels"].values():
        values.extend(value if isinstance(value, (list, tuple)) else [value])
    return int(max(values)) + 1


def resample_dataset_folder(folder: Path | str, spacing_xyz: Sequence[Optional[float]]) -> int:
    """Resample every image and label file of a raw dataset folder in place (each file written to a temporary
    name, then renamed); the number of classes comes from its dataset.json. Returns the number of files."""
    folder = Path(folder)
    with open(folder / "dataset.json") as f:
        num_classes = num_label_classes(json.load(f))
    count = 0
    for sub in IMAGE_FOLDERS + LABEL_FOLDERS:
        if not (folder / sub).is_dir():
            continue
        for path in sorted((folder / sub).iterdir()):
            if not path.name.endswith(FILE_ENDING):
                continue
            staged = path.with_name(".resampling_" + path.name)
            resample_file(str(path), str(staged), sub in LABEL_FOLDERS, spacing_xyz, num_classes)
            os.replace(staged, path)
            count += 1
    return count
