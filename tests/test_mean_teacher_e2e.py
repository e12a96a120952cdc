"""Mean Teacher end to end through the stock nnU-Net CLIs on the tiny synthetic dataset (CPU)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_semiseg.demo.pipeline import StepFailed

TRAINER = 'nnUNetTrainerMeanTeacher'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _pickled_globals(checkpoint_path):
    """Module paths of every class/function the checkpoint's pickle refers to."""
    import pickletools
    import zipfile
    with zipfile.ZipFile(checkpoint_path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))
    found, strings = [], []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ('GLOBAL', 'INST'):
            found.append(str(arg).replace(' ', '.'))
        elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2:
            found.append(f'{strings[-2]}.{strings[-1]}')
        if isinstance(arg, str):
            strings.append(arg)
    assert found, 'expected at least torch globals in a checkpoint pickle'
    return found


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_train_resume_val_predict_export(workspace, tmp_path):
    ws = workspace
    ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu',
           env=ws.train_env(epochs=1, iterations=2, final_validation=True))
    fold = os.path.join(ws.model_folder(TRAINER), 'fold_0')
    final = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert final['trainer_name'] == TRAINER
    assert set(final['semiseg']) >= {'teacher_weights', 'global_iteration'}
    assert final['semiseg']['global_iteration'] == 2
    # Teacher = EMA of the student: same keys, different values after 2 steps (alpha 0.5 then 0.667).
    assert set(final['semiseg']['teacher_weights']) == set(final['network_weights'])
    key = 'decoder.seg_layers.2.weight' if 'decoder.seg_layers.2.weight' in final['network_weights'] else \
        sorted(k for k in final['network_weights'] if k.endswith('weight'))[0]
    assert not torch.equal(final['semiseg']['teacher_weights'][key], final['network_weights'][key])
    # One value per epoch per term.
    assert len(final['logging']['train_sup']) == 1 and len(final['logging']['train_cons']) == 1
    assert np.isfinite(final['logging']['train_cons'][0]) and final['logging']['train_cons'][0] >= 0
    assert os.path.isfile(os.path.join(fold, 'progress_terms.png'))
    assert os.path.isfile(os.path.join(fold, 'progress.png'))
    assert os.path.isfile(os.path.join(fold, 'validation', 'summary.json'))
    teacher_after_run1 = final['semiseg']['teacher_weights'][key].clone()

    # --c with a longer schedule: continues at epoch 1, restores teacher and logged terms. (Final validation is
    # skipped from here on: it was checked above, and --val checks it again below.)
    ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu', '--c',
           env=ws.train_env(epochs=2, iterations=2))
    resumed = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert resumed['current_epoch'] == 2
    assert len(resumed['logging']['train_sup']) == 2 and len(resumed['logging']['train_cons']) == 2
    assert resumed['logging']['train_cons'][0] == pytest.approx(final['logging']['train_cons'][0])
    assert resumed['semiseg']['global_iteration'] == 4
    # The restored teacher moved by the EMA (alpha = 0.75, 0.8 at steps 3, 4): it is close to, not equal to, run 1's.
    t2 = resumed['semiseg']['teacher_weights'][key]
    assert not torch.equal(t2, teacher_after_run1)
    log_files = [f for f in os.listdir(fold) if f.startswith('training_log')]
    assert len(log_files) >= 2

    # --val on the final checkpoint.
    os.remove(os.path.join(fold, 'validation', 'summary.json'))
    ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu', '--val',
           env=ws.train_env(final_validation=True))
    assert os.path.isfile(os.path.join(fold, 'validation', 'summary.json'))

    # Stock predict: strict load of network_weights into build_network_architecture's network.
    images = os.path.join(ws.raw, 'imagesTs')
    pred_ours = str(tmp_path / 'pred_ours')
    ws.run('nnUNetv2_predict', '-i', images, '-o', pred_ours, '-d', '901', '-c', '3d_fullres', '-f', '0', '-tr',
           TRAINER, '-p', ws.plans, '-device', 'cpu', '-npp', '0', '-nps', '0', '--disable_tta')
    assert sorted(f for f in os.listdir(pred_ours) if f.endswith('.nii.gz')) == ['test_000.nii.gz',
                                                                                  'test_001.nii.gz']

    # Plain export, predicted as stock nnUNetTrainer: identical segmentations.
    plain_folder = ws.model_folder('nnUNetTrainer')
    ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder(TRAINER), '-o', plain_folder)
    exported = os.path.join(plain_folder, 'fold_0', 'checkpoint_final.pth')
    assert not [g for g in _pickled_globals(exported) if g.startswith('nnunetv2_semiseg')]  # loads without us
    assert _load(exported)['trainer_name'] == 'nnUNetTrainer'
    pred_plain = str(tmp_path / 'pred_plain')
    ws.run('nnUNetv2_predict', '-i', images, '-o', pred_plain, '-d', '901', '-c', '3d_fullres', '-f', '0', '-tr',
           'nnUNetTrainer', '-p', ws.plans, '-device', 'cpu', '-npp', '0', '-nps', '0', '--disable_tta')
    for case in ('test_000.nii.gz', 'test_001.nii.gz'):
        np.testing.assert_array_equal(_read(os.path.join(pred_ours, case)), _read(os.path.join(pred_plain, case)))

    # Exporting again without --overwrite refuses and keeps the first export.
    with pytest.raises(StepFailed, match='exists'):
        ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder(TRAINER), '-o', plain_folder)
    assert os.path.isfile(exported)


def test_2d_configuration_trains(workspace):
    ws = workspace
    ws.run('nnUNetv2_train', '901', '2d', '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu',
           env=ws.train_env(epochs=1, iterations=2))
    final = _load(os.path.join(ws.model_folder(TRAINER, '2d'), 'fold_0', 'checkpoint_final.pth'))
    assert final['init_args']['configuration'] == '2d'
    assert final['semiseg']['global_iteration'] == 2
    assert np.isfinite(final['logging']['train_cons'][0])


def test_missing_unlabeled_folder_names_the_command(workspace):
    import shutil
    ws = workspace
    shutil.rmtree(os.path.join(ws.preprocessed, f'{ws.plans}_3d_fullres_unlabeled'))
    with pytest.raises(StepFailed) as info:
        ws.run('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu')
    message = str(info.value)
    assert 'nnUNetv2_semiseg_preprocess_unlabeled -d 901 -c 3d_fullres -plans_name nnUNetPlansTiny' in message
    assert 'imagesUnlabeled' in message
