"""Data loader for preprocessed unlabeled cases (``<data_identifier>_unlabeled/``).

It reuses nnU-Net's ``nnUNetDataLoader`` (sampling with replacement, cropping of the enlarged initial patch,
per-sample transforms in the worker) with two changes:

* crops are always uniform random crops: unlabeled cases have no ``class_locations`` to oversample from;
* optionally two *views* per sample that share the spatial transform (rotation, scaling, crop, mirroring) and
  differ only in the random intensity transforms, as weak/strong or teacher/student pairs need. Running the full
  pipeline twice would give spatially misaligned views.
"""
import os
from typing import List, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTansform
from threadpoolctl import threadpool_limits

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform


class UnlabeledDataError(RuntimeError):
    pass


def split_view_transforms(transforms: ComposeTransforms) -> Tuple[ComposeTransforms, ComposeTransforms,
                                                                  ComposeTransforms]:
    """Split nnU-Net's per-sample training pipeline into (shared spatial part, per-view intensity part, tail).

    Randomly applied transforms (``RandomTransform``: noise, blur, brightness, contrast, low resolution, gamma)
    are intensity transforms and are drawn independently per view. Masking and label clean-up must come after
    them (as in nnU-Net). Everything else (2D/3D conversion, spatial transform, mirroring) is shared.
    """
    shared, per_view, tail = [], [], []
    for t in transforms.transforms:
        if isinstance(t, RandomTransform):
            per_view.append(t)
        elif isinstance(t, (MaskImageTransform, RemoveLabelTansform)):
            tail.append(t)
        else:
            shared.append(t)
    return ComposeTransforms(shared), ComposeTransforms(per_view), ComposeTransforms(tail)


class UnlabeledDataLoader(nnUNetDataLoader):
    """Random patches from unlabeled cases; batch dict: ``data`` [, ``data_view2``], ``keys``."""

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, transforms=None,
                 two_views: bool = False):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        self.two_views = two_views
        if two_views:
            if transforms is None:
                raise ValueError('two_views needs the training transforms to split them into shared and per-view parts')
            self.shared_transforms, self.view_transforms, self.tail_transforms = split_view_transforms(transforms)

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        # Always a uniform random crop: no labels means no foreground oversampling and no ignore-label logic.
        has_ignore, self.has_ignore = self.has_ignore, False
        try:
            return super().get_bbox(data_shape, False, None, None, verbose)
        finally:
            self.has_ignore = has_ignore

    def _transform_sample(self, image: torch.Tensor, seg: torch.Tensor) -> List[torch.Tensor]:
        if self.transforms is None:
            return [image] * (2 if self.two_views else 1)
        if not self.two_views:
            return [self.transforms(image=image, segmentation=seg)['image']]
        shared = self.shared_transforms(image=image, segmentation=seg)
        views = []
        for _ in range(2):
            view = self.view_transforms(image=shared['image'].clone(), segmentation=shared['segmentation'].clone())
            views.append(self.tail_transforms(**view)['image'])
        return views

    def generate_train_batch(self):
        keys = self.get_indices()
        batches = None
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for j, key in enumerate(keys):
                data, seg, _, properties = self._data.load_case(key)
                lbs, ubs = self.get_bbox(data.shape[1:], False, None)
                bbox = [[lo, hi] for lo, hi in zip(lbs, ubs)]
                image = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                # The dummy seg marks voxels outside the nonzero region (-1); MaskImageTransform needs it.
                seg_crop = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                if self.patch_size_was_2d:
                    image, seg_crop = image[:, 0], seg_crop[:, 0]
                views = self._transform_sample(image, seg_crop)
                if batches is None:
                    batches = [torch.empty((self.batch_size, *v.shape), dtype=torch.float32) for v in views]
                for b, v in zip(batches, views):
                    b[j] = v
        out = {'data': batches[0], 'keys': keys}
        if self.two_views:
            out['data_view2'] = batches[1]
        return out


def load_unlabeled_dataset(folder: str) -> nnUNetDatasetBlosc2:
    """Open an unlabeled folder written by ``nnUNetv2_semiseg_preprocess_unlabeled``."""
    if not os.path.isdir(folder):
        raise UnlabeledDataError(f'Unlabeled folder {folder} does not exist.')
    identifiers = nnUNetDatasetBlosc2.get_identifiers(folder)
    if len(identifiers) == 0:
        raise UnlabeledDataError(f'Unlabeled folder {folder} holds no preprocessed case (*.b2nd).')
    return nnUNetDatasetBlosc2(folder, identifiers)
