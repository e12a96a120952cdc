"""nnUNetTrainerVoxelAdversarial end to end through the stock nnU-Net CLIs on the tiny synthetic dataset (CPU):
train, --c (discriminator, its optimizer and the teacher restored), strict predict, plain export, in 3D and 2D."""
import json
import os

import numpy as np
import SimpleITK as sitk
import torch

TRAINER = 'nnUNetTrainerVoxelAdversarial'
TERMS = ('sup', 'adv', 'feature', 'cons', 'disc')


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _train(ws, configuration, epochs, *extra):
    ws.run('nnUNetv2_train', '901', configuration, '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu', *extra,
           env=ws.train_env(epochs=epochs, iterations=2))


def _predict(ws, configuration, trainer, out):
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', '901', '-c', configuration,
           '-f', '0', '-tr', trainer, '-p', ws.plans, '-device', 'cpu', '-npp', '0', '-nps', '0', '--disable_tta')


def _check_run(checkpoint, epochs):
    assert checkpoint['trainer_name'] == TRAINER
    semiseg = checkpoint['semiseg']
    assert set(semiseg) == {'global_iteration', 'teacher_weights', 'voxel_discriminator', 'schedule'}
    assert semiseg['schedule']['effective']['num_epochs'] == epochs  # the schedule record that --c compares
    assert semiseg['global_iteration'] == 2 * epochs
    assert set(semiseg['teacher_weights']) == set(checkpoint['network_weights'])      # student + heads
    assert any(k.startswith('heads.') for k in checkpoint['network_weights'])
    disc = semiseg['voxel_discriminator']
    assert set(disc) == {'weights', 'optimizer', 'grad_scaler'} and disc['grad_scaler'] is None   # CPU: no AMP
    # one Adam step of D per student step
    assert {int(s['step']) for s in disc['optimizer']['state'].values()} == {2 * epochs}
    for term in TERMS:
        values = checkpoint['logging'][f'train_{term}']
        assert len(values) == epochs and all(np.isfinite(values)), term


def test_voxel_adversarial_3d_train_resume_predict_export(workspace, tmp_path, monkeypatch):
    ws = workspace
    _train(ws, '3d_fullres', 1)
    fold = os.path.join(ws.model_folder(TRAINER), 'fold_0')
    first = _load(os.path.join(fold, 'checkpoint_final.pth'))
    _check_run(first, 1)
    assert os.path.isfile(os.path.join(fold, 'progress_terms.png'))

    # --c with a longer schedule continues the discriminator's Adam (step 2 -> 4, not a fresh 2) and the logs
    _train(ws, '3d_fullres', 2, '--c')
    resumed = _load(os.path.join(fold, 'checkpoint_final.pth'))
    _check_run(resumed, 2)
    assert resumed['logging']['train_disc'][0] == first['logging']['train_disc'][0]

    # --c restores discriminator, its optimizer and the teacher exactly (in-process load of the checkpoint)
    from nnunetv2_semiseg.trainers.voxel_adversarial import nnUNetTrainerVoxelAdversarial
    ws.set_process_env(monkeypatch)
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['continue_training'] = False
    trainer = nnUNetTrainerVoxelAdversarial(plans, '3d_fullres', 0,
                                            json.load(open(os.path.join(ws.preprocessed, 'dataset.json'))),
                                            torch.device('cpu'))
    trainer.initialize()
    trainer.load_checkpoint(os.path.join(fold, 'checkpoint_final.pth'))
    saved = resumed['semiseg']
    for k, v in trainer.adversarial.discriminator.state_dict().items():
        assert torch.equal(v, saved['voxel_discriminator']['weights'][k]), k
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(v, saved['teacher_weights'][k]), k
    state = trainer.adversarial.optimizer.state_dict()['state']
    assert {int(s['step']) for s in state.values()} == {4}
    assert any(not torch.equal(saved['teacher_weights'][k], resumed['network_weights'][k])
               for k in resumed['network_weights'] if resumed['network_weights'][k].is_floating_point())

    # stock predict (strict load of network_weights into the trainer's build_network_architecture)
    pred_ours = str(tmp_path / 'pred_ours')
    _predict(ws, '3d_fullres', TRAINER, pred_ours)
    cases = sorted(f for f in os.listdir(pred_ours) if f.endswith('.nii.gz'))
    assert cases == ['test_000.nii.gz', 'test_001.nii.gz']

    # plain export (heads dropped; no discriminator or teacher in it), predicted as stock nnUNetTrainer
    plain_folder = ws.model_folder('nnUNetTrainer')
    ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder(TRAINER), '-o', plain_folder)
    exported = _load(os.path.join(plain_folder, 'fold_0', 'checkpoint_final.pth'))
    assert exported['trainer_name'] == 'nnUNetTrainer' and 'semiseg' not in exported
    assert not [k for k in exported['network_weights'] if k.startswith('heads.')]
    pred_plain = str(tmp_path / 'pred_plain')
    _predict(ws, '3d_fullres', 'nnUNetTrainer', pred_plain)
    for case in cases:
        np.testing.assert_array_equal(_read(os.path.join(pred_ours, case)), _read(os.path.join(pred_plain, case)))


def test_voxel_adversarial_2d_trains_and_predicts(workspace, tmp_path):
    ws = workspace
    _train(ws, '2d', 1)
    final = _load(os.path.join(ws.model_folder(TRAINER, '2d'), 'fold_0', 'checkpoint_final.pth'))
    _check_run(final, 1)
    assert final['init_args']['configuration'] == '2d'
    out = str(tmp_path / 'pred')
    _predict(ws, '2d', TRAINER, out)
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['test_000.nii.gz', 'test_001.nii.gz']
