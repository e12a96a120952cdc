"""Real data: LA volumes (UA-MT h5 release subset) through planning, unlabeled preprocessing and Mean Teacher.

The test writes three real volumes to NIfTI itself (h5 axis order (x, y, z), 0.625 mm isotropic, already
z-scored), cropped around the atrium to keep the CPU run short: 2 labeled cases, 1 unlabeled case.
"""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_semiseg.demo.pipeline import nnunet_env, plan_and_preprocess_tiny, run_step, training_env
from nnunetv2_semiseg.utilities.real_data import real_data_folder

LA_DIR = os.path.join(real_data_folder('LA'), '2018LA_Seg_Training Set')
LABELED = ['06SR5RBREL16DQ6M8LWS', '0RZDK210BSMWAA6467LU']
UNLABELED = ['1D7CUD1955YZPGK8XHJX']
CROP = (64, 64, 48)  # x, y, z voxels around the atrium centre


def _write(array_xyz: np.ndarray, path: str) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))  # -> (z, y, x)
    image.SetSpacing((0.625, 0.625, 0.625))
    sitk.WriteImage(image, path, useCompression=True)


def _crop_around_label(image, label):
    centre = np.round(np.argwhere(label > 0).mean(0)).astype(int)
    slices = []
    for c, size, dim in zip(centre, CROP, label.shape):
        start = int(np.clip(c - size // 2, 0, max(0, dim - size)))
        slices.append(slice(start, start + size))
    return image[tuple(slices)], label[tuple(slices)]


@pytest.mark.skipif(not os.path.isdir(LA_DIR), reason=f'real LA subset not found at {LA_DIR}')
def test_real_la_volumes_plan_preprocess_unlabeled_and_train_mean_teacher(tmp_path):
    import h5py
    env = nnunet_env(str(tmp_path))
    raw = os.path.join(env['nnUNet_raw'], 'Dataset961_LAReal')
    for sub in ('imagesTr', 'labelsTr', 'imagesUnlabeled'):
        os.makedirs(os.path.join(raw, sub))
    for case in LABELED + UNLABELED:
        with h5py.File(os.path.join(LA_DIR, case, 'mri_norm2.h5'), 'r') as f:
            image, label = _crop_around_label(f['image'][:].astype(np.float32), f['label'][:].astype(np.uint8))
        if case in LABELED:
            _write(image, os.path.join(raw, 'imagesTr', f'{case}_0000.nii.gz'))
            _write(label, os.path.join(raw, 'labelsTr', f'{case}.nii.gz'))
        else:
            _write(image, os.path.join(raw, 'imagesUnlabeled', f'{case}_0000.nii.gz'))
    with open(os.path.join(raw, 'dataset.json'), 'w') as f:
        json.dump({'channel_names': {'0': 'zscore'}, 'labels': {'background': 0, 'left_atrium': 1},
                   'numTraining': len(LABELED), 'file_ending': '.nii.gz'}, f)

    plan_and_preprocess_tiny(env, 961, ('3d_fullres',), patch_3d=(32, 32, 32))
    pre = os.path.join(env['nnUNet_preprocessed'], 'Dataset961_LAReal')
    unlabeled = sorted(f for f in os.listdir(os.path.join(pre, 'nnUNetPlansTiny_3d_fullres_unlabeled'))
                       if f.endswith('.b2nd') and not f.endswith('_seg.b2nd'))
    assert unlabeled == [f'{UNLABELED[0]}.b2nd']
    plans = json.load(open(os.path.join(pre, 'nnUNetPlans.json')))
    assert plans['configurations']['3d_fullres']['spacing'] == [0.625, 0.625, 0.625]

    run_step(['nnUNetv2_train', '961', '3d_fullres', 'all', '-tr', 'nnUNetTrainerMeanTeacher', '-p',
              'nnUNetPlansTiny', '-device', 'cpu'], training_env(env, 1, 2, 1, final_validation=False))
    final = torch.load(os.path.join(env['nnUNet_results'], 'Dataset961_LAReal',
                                    'nnUNetTrainerMeanTeacher__nnUNetPlansTiny__3d_fullres', 'fold_all',
                                    'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert final['semiseg']['global_iteration'] == 2
    assert np.isfinite(final['logging']['train_sup'][0]) and np.isfinite(final['logging']['train_cons'][0])
