"""Every method trainer end to end on a region-based dataset (sigmoid outputs) through the stock entry points.

One planned region dataset (``region_dataset`` in conftest.py: regions whole = {1, 2} and core = {2}, tiny plans,
fold ``all``) is shared. For each trainer: ``nnUNetv2_train`` 1 epoch of 2 iterations, ``--c`` to 2 epochs,
``nnUNetv2_predict -tr <trainer> --save_probabilities``, ``nnUNetv2_semiseg_export_plain``, and stock nnU-Net's
model-folder prediction on the export. The commands run in one process (tests/region_cli_chain.py)
to pay the interpreter start once; the checks below read what they wrote.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
from nnunetv2_semiseg.trainers.bcp_flpm import nnUNetTrainerBCPFLPM
from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream, nnUNetTrainerDualStream_releasedCode
from nnunetv2_semiseg.trainers.flpm import nnUNetTrainerFLPM
from nnunetv2_semiseg.trainers.flpm_ssnet import nnUNetTrainerSSNetFLPM
from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet
from nnunetv2_semiseg.trainers.voxel_adversarial import nnUNetTrainerVoxelAdversarial

# every method trainer (the ablation and schedule variants share their parent's code paths)
TRAINERS = {cls.__name__: cls for cls in (nnUNetTrainerMeanTeacher, nnUNetTrainerSSNet, nnUNetTrainerFLPM,
                                          nnUNetTrainerSSNetFLPM, nnUNetTrainerDualStream,
                                          nnUNetTrainerDualStream_releasedCode, nnUNetTrainerVoxelAdversarial,
                                          nnUNetTrainerBCP, nnUNetTrainerBCPFLPM)}
CONFIGURATION = '3d_fullres'
REGIONS_CLASS_ORDER = [1, 2]
CASE = 'test_000'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def run_chain(ws, out: str, trainers, resume: bool = True) -> dict:
    """tests/region_cli_chain.py for ``trainers`` on the planned workspace ``ws``; its report (one record each)."""
    report_file = os.path.join(out, 'report.json')
    env = ws.train_env(epochs=1, iterations=2, val_iterations=1)
    env['OMP_NUM_THREADS'] = '1'
    helper = os.path.join(os.path.dirname(__file__), 'region_cli_chain.py')
    proc = subprocess.run([sys.executable, helper, report_file, str(ws.dataset_id), ws.plans, CONFIGURATION,
                           os.path.join(ws.raw, 'imagesTs'), out, *([] if resume else ['--no-resume']), *trainers],
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, encoding='utf-8', errors='replace')
    if not os.path.isfile(report_file):
        pytest.fail(f'the command chain wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}')
    with open(report_file) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def chain(region_dataset, tmp_path_factory):
    return run_chain(region_dataset, str(tmp_path_factory.mktemp('region_chain')), TRAINERS)


def _region_segmentation(probabilities: np.ndarray) -> np.ndarray:
    """nnU-Net's region decoding: each region's label where its sigmoid probability > 0.5, later regions win."""
    seg = np.zeros(probabilities.shape[1:], np.uint8)
    for channel, label in enumerate(REGIONS_CLASS_ORDER):
        seg[probabilities[channel] > 0.5] = label
    return seg


@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_train_resume_predict_export_on_regions(chain, trainer):
    record = chain.get(trainer)
    assert record is not None, f'{trainer} did not run'
    assert record['ok'], f'{trainer} failed at {record.get("failed_step")}:\n{record.get("error")}'
    cls = TRAINERS[trainer]

    # checkpoint after --c: two epochs of two iterations, one value per epoch for every term
    final = _load(os.path.join(record['model'], 'fold_all', 'checkpoint_final.pth'))
    assert final['trainer_name'] == trainer and final['current_epoch'] == 2
    assert final['semiseg']['global_iteration'] == 4
    for term in cls.loss_term_names:
        values = final['logging'][f'train_{term}']
        assert len(values) == 2 and np.all(np.isfinite(values)), (term, values)
    weights = final['network_weights']
    seg_layers = [v for k, v in weights.items() if k.endswith('seg_layers.1.weight')]
    assert seg_layers and all(v.shape[0] == 2 for v in seg_layers)          # one output per region, no background

    # prediction by the trainer: region probabilities (sigmoids) and the labels nnU-Net decodes from them
    pred = os.path.join(record['base'], 'pred')
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, f'{CASE}.nii.gz')))
    probabilities = np.load(os.path.join(pred, f'{CASE}.npz'))['probabilities'].astype(np.float64)
    assert probabilities.shape == (2, *seg.shape)
    assert probabilities.min() >= 0 and probabilities.max() <= 1
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}
    assert np.mean(_region_segmentation(probabilities) != seg) < 1e-3

    # the exported model: stock nnUNetTrainer weights, predicted by stock nnU-Net
    exported = _load(os.path.join(record['base'], 'plain', 'fold_all', 'checkpoint_final.pth'))
    assert exported['trainer_name'] == 'nnUNetTrainer' and exported['exported_from_trainer'] == trainer
    assert not any(k.startswith(('heads.', 'stream_', 'region_ensemble')) for k in exported['network_weights'])
    plain_seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(record['base'], 'pred_plain', f'{CASE}.nii.gz')))
    assert plain_seg.shape == seg.shape and set(np.unique(plain_seg).tolist()) <= {0, 1, 2}


def test_dual_stream_region_model_is_saved_and_rebuilt_as_the_sigmoid_ensemble(chain, region_dataset):
    record = chain['nnUNetTrainerDualStream']
    assert record['ok'], record.get('error')
    final = _load(os.path.join(record['model'], 'fold_all', 'checkpoint_final.pth'))
    assert int(final['network_weights']['region_ensemble']) == 1
    # what nnUNetv2_predict does: build from the plans alone, load strictly, then the sigmoid ensemble is active
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(os.path.join(record['model'], 'plans.json'))
    net = nnUNetTrainerDualStream.build_network_architecture(plans, plans.get_configuration(CONFIGURATION), 1, 2,
                                                             enable_deep_supervision=False)
    assert not net.regions
    net.load_state_dict(final['network_weights'])
    assert net.regions
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = (torch.sigmoid(net.stream_a(x)) + torch.sigmoid(net.stream_b(x))) / 2
        assert torch.allclose(torch.sigmoid(net(x)), expected, atol=1e-5)
