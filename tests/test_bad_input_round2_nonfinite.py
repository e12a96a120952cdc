"""NaN / Inf voxels in unlabeled images (.mha keeps them; NIfTI readers turn NaN into 0) are refused by name."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.data.preprocess_unlabeled import UnlabeledPreprocessingError, check_unlabeled_images
from nnunetv2_semiseg.pseudolabel import PseudoLabelError, _collect_cases


def _write(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, path)


@pytest.fixture
def mha_dataset(tmp_path):
    raw = tmp_path / 'Dataset950_Mha'
    rng = np.random.default_rng(0)
    dataset_json = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'fg': 1}, 'numTraining': 1,
                    'file_ending': '.mha'}
    (raw).mkdir()
    (raw / 'dataset.json').write_text(json.dumps(dataset_json))
    _write(str(raw / 'imagesTr' / 'L1_0000.mha'), rng.normal(size=(6, 8, 8)))
    label = sitk.GetImageFromArray((rng.random((6, 8, 8)) > 0.5).astype(np.uint8))
    label.SetSpacing((1.0, 1.0, 2.0))
    os.makedirs(raw / 'labelsTr')
    sitk.WriteImage(label, str(raw / 'labelsTr' / 'L1.mha'))
    good = rng.normal(size=(6, 8, 8))
    bad = rng.normal(size=(6, 8, 8))
    bad[1:3, 2:5, 0:4] = np.nan  # 2 * 3 * 4 = 24 NaN voxels
    bad[5, 7, 7] = np.inf
    bad[0, 0, 0] = -np.inf
    _write(str(raw / 'imagesUnlabeled' / 'U1_0000.mha'), good)
    _write(str(raw / 'imagesUnlabeled' / 'U2_0000.mha'), bad)
    return raw, dataset_json


def test_mha_keeps_nan_so_the_check_has_something_to_find(mha_dataset):
    raw, _ = mha_dataset
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / 'imagesUnlabeled' / 'U2_0000.mha')))
    assert np.isnan(voxels).sum() == 24 and np.isinf(voxels).sum() == 2


@pytest.mark.parametrize('error', [UnlabeledPreprocessingError, PseudoLabelError])
def test_non_finite_unlabeled_voxels_are_refused_naming_case_and_counts(mha_dataset, error):
    raw, dataset_json = mha_dataset
    cases = {'U1': [str(raw / 'imagesUnlabeled' / 'U1_0000.mha')],
             'U2': [str(raw / 'imagesUnlabeled' / 'U2_0000.mha')]}
    with pytest.raises(error) as info:
        check_unlabeled_images(cases, str(raw), dataset_json, error=error)
    message = str(info.value)
    assert "'U2'" in message and 'U2_0000.mha' in message
    assert '26 non-finite voxel(s) of 384 (24 NaN, 2 Inf)' in message
    # The finite case alone passes.
    assert check_unlabeled_images({'U1': cases['U1']}, str(raw), dataset_json, error=error) == []


def test_pseudolabel_refuses_non_finite_unlabeled_image(mha_dataset):
    raw, dataset_json = mha_dataset
    with pytest.raises(PseudoLabelError, match=r"'U2'.*26 non-finite voxel\(s\)"):
        _collect_cases(str(raw), dataset_json)
