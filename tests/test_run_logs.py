"""What a run says about itself: the start-of-run set-up lines, the ramped weights per epoch, and the schedule
record in debug.json and the checkpoint (one tiny in-process Mean Teacher run: 2 epochs x 1 iteration)."""
import glob
import json
import os

import torch


def test_start_of_run_lines_epoch_weights_and_schedule_record(workspace, monkeypatch):
    from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
    monkeypatch.delenv('nnUNet_semiseg_seed', raising=False)
    for k, v in workspace.train_env(epochs=2, iterations=1, val_iterations=1).items():
        if k.startswith('nnUNet'):
            monkeypatch.setenv(k, v)
    plans = json.load(open(os.path.join(workspace.preprocessed, workspace.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(workspace.preprocessed, 'dataset.json')))
    trainer = nnUNetTrainerMeanTeacher(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))
    trainer.run_training()

    fold = trainer.output_folder
    log_files = glob.glob(os.path.join(fold, 'training_log_*.txt'))
    assert len(log_files) == 1
    log = open(log_files[0]).read()
    # Six labeled cases: fold 0 trains on 4, validates on 2; the fixture has 4 unlabeled cases; plans' batch 2.
    assert ('Semi-supervised run of nnUNetTrainerMeanTeacher: 4 labeled training cases (fold 0; 2 validation '
            'cases), 4 unlabeled cases') in log
    assert "Batch per step: 2 labeled + 2 unlabeled patches (unlabeled_batch_size=None: the plans' batch size)." \
        in log
    assert ('Schedule: 2 epochs x 1 iterations (2 optimizer steps), 1 validation iterations per epoch. Environment '
            'overrides: nnUNet_semiseg_num_epochs=2, nnUNet_semiseg_iterations_per_epoch=1, '
            'nnUNet_semiseg_val_iterations_per_epoch=1.') in log
    assert "Loss term sup: nnU-Net's supervised loss on the labeled rows, weight 1, no ramp." in log
    # Mean Teacher: weight 0.1, sigmoid ramp over 40 % of the 2 steps -> round(0.8) = 1 step; exp(-5) = 0.006738.
    assert ('Loss term cons: weight 0.1, sigmoid ramp exp(-5(1-t)^2) over the first 40% of training (1 of 2 steps; '
            'factor 0.006738 at the start).') in log
    assert 'consistency_weight=0.1' in log and 'consistency_ramp_length=0.4' in log
    # Per epoch, next to the loss: the weight of the epoch's last step (t = 0, then t = 1/2 >= 0.4: full weight).
    weights = [line.split('(weight ')[1].strip().rstrip(')') for line in log.splitlines()
               if 'train_cons' in line and '(weight ' in line]
    assert weights == ['0.0006738', '0.1']
    # The schedule record: in debug.json as JSON, and in the final checkpoint's semiseg state.
    expected = {'environment': {'nnUNet_semiseg_num_epochs': '2', 'nnUNet_semiseg_iterations_per_epoch': '1',
                                'nnUNet_semiseg_val_iterations_per_epoch': '1', 'nnUNet_semiseg_seed': None},
                'effective': {'num_epochs': 2, 'num_iterations_per_epoch': 1, 'num_val_iterations_per_epoch': 1}}
    debug = json.load(open(os.path.join(fold, 'debug.json')))
    assert debug['semiseg_schedule'] == expected
    final = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert final['semiseg']['schedule'] == expected
    assert final['semiseg']['global_iteration'] == 2
