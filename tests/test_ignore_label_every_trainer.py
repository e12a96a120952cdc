"""Every method trainer end to end on a sparsely annotated dataset (nnU-Net's ignore label) through the stock
entry points.

One planned dataset (``ignore_dataset`` in conftest.py: two classes, labels on every third axial slice, the other
slices = ignore label 3) is shared. For each trainer the command chain of the region test
(tests/region_cli_chain.py) without its ``--c`` step (resuming does not depend on the label layout and is run there
and in the DDP test): ``nnUNetv2_train`` 1 epoch of 2 iterations, ``nnUNetv2_predict -tr <trainer>
--save_probabilities``, ``nnUNetv2_semiseg_export_plain`` and stock nnU-Net's prediction of the export. The ignore label is no class: the networks have three outputs (background and the two classes) and no
prediction contains label 3. That no ignored voxel reaches a method term as a class is tested per method in
tests/test_label_layouts.py, tests/test_dualstream_released_layouts.py and the trainers' own tests.
"""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import IGNORE_LABEL
from test_region_every_trainer import CASE, TRAINERS, _load, run_chain


@pytest.fixture(scope='module')
def chain(ignore_dataset, tmp_path_factory):
    return run_chain(ignore_dataset, str(tmp_path_factory.mktemp('ignore_chain')), TRAINERS, resume=False)


def test_the_fixture_is_sparse(ignore_dataset):
    labels = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(ignore_dataset.raw, 'labelsTr', 'lab_000.nii.gz')))
    annotated = np.array([not np.all(s == IGNORE_LABEL) for s in labels])
    assert annotated.tolist() == [i % 3 == 0 for i in range(labels.shape[0])]
    assert set(np.unique(labels[annotated]).tolist()) == {0, 1, 2}


@pytest.mark.parametrize('trainer', list(TRAINERS))
def test_train_resume_predict_export_with_an_ignore_label(chain, trainer):
    record = chain.get(trainer)
    assert record is not None, f'{trainer} did not run'
    assert record['ok'], f'{trainer} failed at {record.get("failed_step")}:\n{record.get("error")}'

    final = _load(os.path.join(record['model'], 'fold_all', 'checkpoint_final.pth'))
    assert final['trainer_name'] == trainer and final['current_epoch'] == 1
    for term in TRAINERS[trainer].loss_term_names:
        values = final['logging'][f'train_{term}']
        assert len(values) == 1 and np.all(np.isfinite(values)), (term, values)
    seg_layers = [v for k, v in final['network_weights'].items() if k.endswith('seg_layers.1.weight')]
    assert seg_layers and all(v.shape[0] == 3 for v in seg_layers)          # background + 2 classes, no ignore

    pred = os.path.join(record['base'], 'pred')
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, f'{CASE}.nii.gz')))
    probabilities = np.load(os.path.join(pred, f'{CASE}.npz'))['probabilities']
    assert probabilities.shape == (3, *seg.shape)
    assert np.allclose(probabilities.sum(0), 1, atol=1e-3)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2}

    exported = _load(os.path.join(record['base'], 'plain', 'fold_all', 'checkpoint_final.pth'))
    assert exported['trainer_name'] == 'nnUNetTrainer' and exported['exported_from_trainer'] == trainer
    plain_seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(record['base'], 'pred_plain', f'{CASE}.nii.gz')))
    assert plain_seg.shape == seg.shape and set(np.unique(plain_seg).tolist()) <= {0, 1, 2}
