"""Shared fixtures: a tiny synthetic dataset planned and preprocessed once per session through the stock CLIs.

``tiny_dataset`` (session): Dataset901, 6 labeled (fold 0: 4 train / 2 val), 4 unlabeled and 2 test cases of
20x32x32 voxels, planned by nnU-Net, shrunk to the plans ``nnUNetPlansTiny`` (3 stages, 8/16/32 features, patch
16x32x32 / 32x32, batch 2) and preprocessed for ``3d_fullres`` and ``2d`` (labeled and unlabeled).

``region_dataset`` (session): Dataset902, a region-based version (dataset.json regions whole = {1, 2}, core = {2})
with 3 labeled, 2 unlabeled and 1 test case of 16x24x24 voxels, planned and shrunk to ``nnUNetPlansTinyRegions``
(3 stages, 4/8/16 features, patch 16x16x16, batch 2), ``3d_fullres`` only; trained on fold ``all``. Shared by every
test that needs a planned region dataset.

``ignore_dataset`` (session): Dataset903, two classes and nnU-Net's ignore label (3): every labeled case is
annotated on every third axial slice only (the other slices = ignore), the sparse annotation an ignore label is for;
3 labeled, 2 unlabeled and 1 test case of 16x24x24 voxels, plans ``nnUNetPlansTinySparse`` (as the region plans),
``3d_fullres`` only, fold ``all``.

``one_torch_thread`` (function, opt-in with ``pytestmark = pytest.mark.usefixtures('one_torch_thread')``): in-process
tests on tiny tensors run with one torch thread; on a loaded 2-core machine intra-op threads only contend.

``workspace`` (function): a private copy of that nnU-Net tree (raw + preprocessed, empty results) so tests that
train or write can run in any order. ``workspace.train_env(epochs, iterations)`` gives the env for a short run.
"""
import os
import shutil
from dataclasses import dataclass
from typing import Dict

import numpy as np
import pytest

from nnunetv2_semiseg.demo.pipeline import nnunet_env, plan_and_preprocess_tiny, run_step, training_env
from nnunetv2_semiseg.demo.synthetic import make_synthetic_dataset

TINY_ID = 901
TINY_NAME = 'Dataset901_SemiSegSynth'
TINY_PLANS = 'nnUNetPlansTiny'
REGION_ID = 902
REGION_NAME = 'Dataset902_SemiSegRegions'
REGION_PLANS = 'nnUNetPlansTinyRegions'
IGNORE_ID = 903
IGNORE_NAME = 'Dataset903_SemiSegSparse'
IGNORE_PLANS = 'nnUNetPlansTinySparse'
IGNORE_LABEL = 3


@dataclass
class Workspace:
    base: str
    dataset_id: int = TINY_ID
    dataset_name: str = TINY_NAME
    plans: str = TINY_PLANS

    @property
    def env(self) -> Dict[str, str]:
        return nnunet_env(self.base)

    @property
    def raw(self) -> str:
        return os.path.join(self.base, 'nnUNet_raw', self.dataset_name)

    @property
    def preprocessed(self) -> str:
        return os.path.join(self.base, 'nnUNet_preprocessed', self.dataset_name)

    @property
    def results(self) -> str:
        return os.path.join(self.base, 'nnUNet_results', self.dataset_name)

    def model_folder(self, trainer: str, configuration: str = '3d_fullres') -> str:
        return os.path.join(self.results, f'{trainer}__{self.plans}__{configuration}')

    def train_env(self, epochs: int = 1, iterations: int = 2, val_iterations: int = 1,
                  final_validation: bool = False) -> Dict[str, str]:
        """Env for a short run. nnU-Net's final validation (slow on CPU) is skipped unless asked for; the
        tests that check it, and every ``--val`` run, pass final_validation=True."""
        return training_env(self.env, epochs, iterations, val_iterations, final_validation=final_validation)

    def run(self, *command: str, env=None) -> str:
        return run_step(list(command), env if env is not None else self.train_env())

    def copy_to(self, base: str) -> 'Workspace':
        """A private copy of this tree at ``base`` (raw + preprocessed, empty results), same dataset and plans."""
        for sub in ('nnUNet_raw', 'nnUNet_preprocessed'):
            shutil.copytree(os.path.join(self.base, sub), os.path.join(base, sub), symlinks=True)
        os.makedirs(os.path.join(base, 'nnUNet_results'))
        return Workspace(base, self.dataset_id, self.dataset_name, self.plans)

    def set_process_env(self, monkeypatch) -> None:
        """For in-process API calls: nnU-Net paths and single-process settings in os.environ."""
        for k, v in self.train_env().items():
            if k.startswith('nnUNet'):
                monkeypatch.setenv(k, v)


@pytest.fixture
def one_torch_thread():
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> Workspace:
    base = str(tmp_path_factory.mktemp('tiny_nnunet'))
    env = nnunet_env(base)
    make_synthetic_dataset(env['nnUNet_raw'], TINY_ID, name='SemiSegSynth', num_labeled=6, num_unlabeled=4,
                           num_test=2, shape=(20, 32, 32), seed=1)
    plan_and_preprocess_tiny(env, TINY_ID, ('3d_fullres', '2d'), plans_name=TINY_PLANS)
    return Workspace(base)


@pytest.fixture(scope='session')
def region_dataset(tmp_path_factory) -> Workspace:
    base = str(tmp_path_factory.mktemp('region_nnunet'))
    env = nnunet_env(base)
    make_synthetic_dataset(env['nnUNet_raw'], REGION_ID, name='SemiSegRegions', num_labeled=3, num_unlabeled=2,
                           num_test=1, shape=(16, 24, 24), num_classes=2, regions=True, seed=2)
    plan_and_preprocess_tiny(env, REGION_ID, ('3d_fullres',), plans_name=REGION_PLANS, features=(4, 8, 16),
                             patch_3d=(16, 16, 16))
    return Workspace(base, REGION_ID, REGION_NAME, REGION_PLANS)


@pytest.fixture(scope='session')
def ignore_dataset(tmp_path_factory) -> Workspace:
    import json
    import SimpleITK as sitk
    base = str(tmp_path_factory.mktemp('ignore_nnunet'))
    env = nnunet_env(base)
    folder = make_synthetic_dataset(env['nnUNet_raw'], IGNORE_ID, name='SemiSegSparse', num_labeled=3,
                                    num_unlabeled=2, num_test=1, shape=(16, 24, 24), num_classes=2, seed=3)
    for name in sorted(os.listdir(os.path.join(folder, 'labelsTr'))):
        path = os.path.join(folder, 'labelsTr', name)
        image = sitk.ReadImage(path)
        labels = sitk.GetArrayFromImage(image)
        annotated = np.zeros(labels.shape[0], bool)
        annotated[::3] = True                                       # slices 0, 3, 6, ... keep their labels
        labels[~annotated] = IGNORE_LABEL
        sparse = sitk.GetImageFromArray(labels)
        sparse.CopyInformation(image)
        sitk.WriteImage(sparse, path)
    with open(os.path.join(folder, 'dataset.json')) as f:
        dataset_json = json.load(f)
    dataset_json['labels']['ignore'] = IGNORE_LABEL
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dataset_json, f, indent=2)
    plan_and_preprocess_tiny(env, IGNORE_ID, ('3d_fullres',), plans_name=IGNORE_PLANS, features=(4, 8, 16),
                             patch_3d=(16, 16, 16))
    return Workspace(base, IGNORE_ID, IGNORE_NAME, IGNORE_PLANS)


@pytest.fixture
def workspace(tiny_dataset, tmp_path) -> Workspace:
    return tiny_dataset.copy_to(str(tmp_path / 'ws'))


class _InProcessPool:
    """Stand-in for nnU-Net's spawn Pool: same starmap results, no child processes (fast on a 2-core machine)."""

    def __init__(self, *_args, **_kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, func, iterable):
        return [func(*args) for args in iterable]


@pytest.fixture
def verify_dataset_in_process(monkeypatch):
    """nnU-Net's own ``verify_dataset_integrity`` on a raw dataset folder, with its worker pool run in-process."""
    import types
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi
    monkeypatch.setattr(vdi, 'multiprocessing',
                        types.SimpleNamespace(get_context=lambda _method: types.SimpleNamespace(Pool=_InProcessPool)))
    return lambda folder: vdi.verify_dataset_integrity(str(folder), 1)
