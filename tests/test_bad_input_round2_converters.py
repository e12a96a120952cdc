"""Converter bad input, round two: a patient in two folders (ACDC), non-finite voxels, unwritable output."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import acdc, common
from test_convert_acdc import make_nifti_release


def test_acdc_patient_in_training_and_testing_is_refused_naming_both(tmp_path):
    root = make_nifti_release(tmp_path / "acdc", ["patient001", "patient002"])
    copy = root / "testing" / "patient002"
    copy.parent.mkdir()
    (root / "training" / "patient002").rename(copy)
    make_nifti_release(tmp_path / "acdc", ["patient002"])  # a second patient002 under training/
    with pytest.raises(common.ConversionError) as info:
        acdc.find_patients(root, "auto")
    assert str(info.value) == (
        f"Patient patient002 is present twice: {root / 'training' / 'patient002'} and {copy}. Remove or rename one "
        f"copy (the release has training/patient001..100 and testing/patient101..150), or point -i at the folder "
        f"that holds the copy you want.")
