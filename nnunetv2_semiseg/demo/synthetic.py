"""Small synthetic nnU-Net raw datasets with unlabeled images, for the demo, the tests and the benchmarks.

Each case is an MR-like volume holding one blob-shaped structure (an ellipsoid deformed by low-frequency noise)
whose boundary is blurred and whose contrast to the background is low relative to the noise. That makes the
task need more than a few labeled cases: exactly the regime where unlabeled images can help.
With ``num_classes=2`` the blob has an inner core of label 2 (a multi-class task, like ACDC's nested
structures). ``regions=True`` writes an nnU-Net region-based dataset.json (whole = {1, 2}, core = {2}).
"""
import json
import os
import shutil
import tempfile
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, zoom


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], coarse: int = 4) -> np.ndarray:
    small = rng.standard_normal([max(2, s // coarse) for s in shape])
    return zoom(small, [s / c for s, c in zip(shape, small.shape)], order=1)[tuple(slice(0, s) for s in shape)]


def make_case(rng: np.random.Generator, shape: Tuple[int, ...], num_classes: int = 1,
              contrast: float = 0.6, noise: float = 0.6, blur: float = 1.5) -> Tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair; arrays in numpy (z, y, x) order, float32 and uint8."""
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing='ij')
    center = rng.uniform(-0.25, 0.25, len(shape))
    radii = rng.uniform(0.35, 0.6, len(shape))
    dist = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)))
    dist = dist + 0.25 * _smooth_noise(rng, shape)  # irregular boundary
    label = (dist < 1.0).astype(np.uint8)
    if num_classes >= 2:
        label[dist < 0.55] = 2
    image = contrast * (dist < 1.0).astype(np.float32)
    if num_classes >= 2:
        image += 0.5 * contrast * (dist < 0.55)
    image = gaussian_filter(image, blur)                        # blurred boundary
    image += 0.4 * _smooth_noise(rng, shape, coarse=8)           # bias-field-like inhomogeneity
    image += noise * rng.standard_normal(shape)
    image = (image * 100 + 300).astype(np.float32)               # MR-like arbitrary units
    return image, label


def _write(array: np.ndarray, spacing: Sequence[float], path: str) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing][::-1])  # numpy (z, y, x) -> ITK (x, y, z)
    sitk.WriteImage(img, path, useCompression=True)


def make_synthetic_dataset(raw_root: str, dataset_id: int, name: str = 'SemiSegSynth', num_labeled: int = 6,
                           num_unlabeled: int = 12, num_test: int = 4, shape: Tuple[int, ...] = (24, 40, 40),
                           spacing: Tuple[float, ...] = (1.5, 1.0, 1.0), num_classes: int = 1,
                           regions: bool = False, seed: int = 0, overwrite: bool = False) -> str:
    """Write ``Dataset{id:03d}_{name}`` with imagesTr/labelsTr, imagesUnlabeled, imagesTs/labelsTs.

    Returns the dataset folder. Written to a temporary folder and renamed, so a crash leaves nothing behind.
    """
    folder = os.path.join(raw_root, f'Dataset{dataset_id:03d}_{name}')
    if os.path.exists(folder):
        if not overwrite:
            raise FileExistsError(f'{folder} exists; pass overwrite=True (or --overwrite) to replace it.')
        shutil.rmtree(folder)
    os.makedirs(raw_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.tmp_synth_', dir=raw_root)
    try:
        for sub in ('imagesTr', 'labelsTr', 'imagesUnlabeled', 'imagesTs', 'labelsTs'):
            os.makedirs(os.path.join(tmp, sub))
        rng = np.random.default_rng(seed)
        groups = [('imagesTr', 'labelsTr', 'lab', num_labeled), ('imagesUnlabeled', None, 'unl', num_unlabeled),
                  ('imagesTs', 'labelsTs', 'test', num_test)]
        for image_dir, label_dir, prefix, count in groups:
            for i in range(count):
                image, label = make_case(rng, shape, num_classes)
                case = f'{prefix}_{i:03d}'
                _write(image, spacing, os.path.join(tmp, image_dir, f'{case}_0000.nii.gz'))
                if label_dir is not None:
                    _write(label, spacing, os.path.join(tmp, label_dir, f'{case}.nii.gz'))
        if regions:
            labels = {'background': 0, 'whole': [1, 2], 'core': [2]}
        else:
            labels = {'background': 0, **{f'structure{c}': c for c in range(1, num_classes + 1)}}
        dataset_json = {'channel_names': {'0': 'MRI'}, 'labels': labels, 'numTraining': num_labeled,
                        'file_ending': '.nii.gz', 'name': name,
                        'description': 'synthetic blobs with blurred low-contrast boundaries (nnunetv2_semiseg)'}
        if regions:
            dataset_json['regions_class_order'] = [1, 2]
        with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
            json.dump(dataset_json, f, indent=2)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def make_tiny_plans(plans: dict, plans_name: str, features: Sequence[int] = (8, 16, 32),
                    patch_3d: Sequence[int] = (16, 32, 32), patch_2d: Sequence[int] = (32, 32),
                    batch_size: Optional[int] = 2) -> dict:
    """Shrink nnU-Net plans to a 3-stage network on small patches (CPU tests and the demo).

    The data identifiers change with the plans name, so the tiny preprocessed data never mixes with real plans.
    """
    import copy
    plans = copy.deepcopy(plans)
    plans['plans_name'] = plans_name
    for cfg_name, cfg in plans['configurations'].items():
        if 'architecture' not in cfg:
            continue
        dim = 2 if cfg_name == '2d' else 3
        n = len(features)
        kwargs = cfg['architecture']['arch_kwargs']
        kwargs['n_stages'] = n
        kwargs['features_per_stage'] = list(features)
        kwargs['kernel_sizes'] = [[3] * dim for _ in range(n)]
        kwargs['strides'] = [[1] * dim] + [[2] * dim for _ in range(n - 1)]
        kwargs['n_conv_per_stage'] = [1] * n
        kwargs['n_conv_per_stage_decoder'] = [1] * (n - 1)
        cfg['patch_size'] = list(patch_2d if dim == 2 else patch_3d)
        if batch_size is not None:
            cfg['batch_size'] = batch_size
        cfg['data_identifier'] = f'{plans_name}_{cfg_name}'
    return plans
