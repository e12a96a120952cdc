"""progress.png / progress_terms.png of the semi-supervised trainers, and the logged terms' way to Weights & Biases."""
import glob
import importlib.util
import json
import os
import time

import matplotlib.pyplot as plt
import pytest
import seaborn as sns
import torch

from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_semiseg.utilities.plotting import draw_loss_terms, draw_progress
from nnunetv2_semiseg.utilities.progress_logger import (TOTAL_LABEL, SemiSupervisedLocalLogger, SupervisedCurve,
                                                        supervised_curve_for, training_curve)


def _logging(num_epochs=3, **terms):
    """nnU-Net's logging dict for ``num_epochs`` epochs plus ``train_<term>`` lists."""
    logging = LocalLogger().my_fantastic_logging
    logging.update({
        'train_losses': [1.5, 1.2, 1.0][:num_epochs], 'val_losses': [1.1, 0.9, 0.8][:num_epochs],
        'mean_fg_dice': [0.1, 0.3, 0.5][:num_epochs], 'ema_fg_dice': [0.1, 0.12, 0.158][:num_epochs],
        'dice_per_class_or_region': [[0.1], [0.3], [0.5]][:num_epochs], 'lrs': [0.01, 0.007, 0.004][:num_epochs],
        'epoch_start_timestamps': [0.0, 10.0, 20.0][:num_epochs],
        'epoch_end_timestamps': [8.0, 19.0, 27.5][:num_epochs]})
    logging.update({f'train_{k}': list(v) for k, v in terms.items()})
    return logging


def test_training_curve_per_trainer_kind():
    # A 'sup' term (Mean Teacher, SS-Net, ...): that term.
    logging = _logging(sup=[0.8, 0.6, 0.5], cons=[0.01, 0.02, 0.03])
    values, label = training_curve(logging, supervised_curve_for(('sup', 'cons')))
    assert values == [0.8, 0.6, 0.5] and label == 'loss_tr (supervised part: sup)'
    # BCP: pretrain + mean(inward, outward); the switch epoch mixes both phases (means over its iterations).
    logging = _logging(pretrain=[1.0, 0.25, 0.0], inward=[0.0, 0.6, 0.8], outward=[0.0, 0.4, 0.6])
    values, label = training_curve(logging, supervised_curve_for(('pretrain', 'inward', 'outward')))
    assert values == pytest.approx([1.0, 0.25 + 0.5, 0.7])
    assert 'BCP' in label and 'mean(inward, outward)' in label and 'pseudo-labels' in label
    # BCP with inward mixing only: pretrain + inward.
    values, label = training_curve(_logging(pretrain=[1.0, 0.0, 0.0], inward=[0.0, 0.6, 0.5]),
                                   supervised_curve_for(('pretrain', 'inward')))
    assert values == pytest.approx([1.0, 0.6, 0.5]) and 'pretrain + inward' in label
    # No supervised term at all: the total, said so.
    assert supervised_curve_for(('foo', 'bar')) is None
    assert training_curve(_logging(foo=[1, 2, 3]), None) == ([1.5, 1.2, 1.0], TOTAL_LABEL)
    # A trainer's declaration wins; one naming a term it does not log is refused.
    halved = SupervisedCurve({'sup': 0.5}, 'half')
    assert training_curve(_logging(sup=[0.8, 0.6, 0.5]), supervised_curve_for(('sup',), halved)) == \
        (pytest.approx([0.4, 0.3, 0.25]), 'half')
    with pytest.raises(ValueError, match=r"\['cons'\].*\['sup'\]"):
        supervised_curve_for(('sup',), SupervisedCurve({'cons': 1.0}, 'x'))


def test_dual_stream_declares_the_per_stream_share():
    from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream, nnUNetTrainerDualStream_noContrast
    for cls in (nnUNetTrainerDualStream, nnUNetTrainerDualStream_noContrast):
        assert dict(supervised_curve_for(cls.loss_term_names, cls.progress_supervised_curve).weights) == {'sup': 0.5}


def test_pictures_keep_labels_and_legends_clear_under_seaborn_font_scale():
    # nnU-Net's own plot leaves seaborn's font_scale=2.5 behind in the process; ours must not inherit it.
    with plt.rc_context():
        sns.set(font_scale=2.5)
        terms_fig = draw_loss_terms({'sup': [0.8, 0.6, 0.5], 'cons': [0.01, 0.02, 0.03]}, total=[0.9, 0.7, 0.6])
        logging = _logging(pretrain=[1.0, 0.25, 0.0], inward=[0.0, 0.6, 0.8], outward=[0.0, 0.4, 0.6])
        curve, label = training_curve(logging, supervised_curve_for(('pretrain', 'inward', 'outward')))
        progress_fig = draw_progress(curve, label, logging, 3)
    try:
        # progress_terms.png: default font sizes, the legend right of the axes, the total drawn first.
        terms_fig.canvas.draw()
        ax = terms_fig.axes[0]
        assert ax.yaxis.label.get_fontsize() == pytest.approx(10.0)
        assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ['total (optimised)', 'sup', 'cons']
        assert list(ax.get_lines()[0].get_ydata()) == [0.9, 0.7, 0.6]

        # progress.png: the loss panel's legend below it; its training curve is BCP's per-batch loss.
        progress_fig.canvas.draw()
        ax_loss, ax_time, ax_lr = progress_fig.axes[:3]
        legend = ax_loss.get_legend()
        assert legend.get_window_extent().y1 <= ax_loss.get_window_extent().y0
        assert [t.get_text() for t in legend.get_texts()][:2] == [label, 'loss_val (supervised, validation cases)']
        assert list(ax_loss.get_lines()[0].get_ydata()) == pytest.approx([1.0, 0.75, 0.7])
        assert list(ax_loss.get_lines()[1].get_ydata()) == [1.1, 0.9, 0.8]
        assert list(ax_time.get_lines()[0].get_ydata()) == [8.0, 9.0, 7.5]   # epoch durations
        assert ax_time.get_legend().get_window_extent().x0 >= ax_time.get_window_extent().x1
    finally:
        plt.close(terms_fig)
        plt.close(progress_fig)


def test_logger_writes_both_pictures_from_the_shared_dict(tmp_path):
    stock = LocalLogger()
    logger = SemiSupervisedLocalLogger.replacing(stock, ('sup', 'cons'))
    assert logger.my_fantastic_logging is stock.my_fantastic_logging   # keys registered on either stay visible
    logger.my_fantastic_logging.clear()
    logger.my_fantastic_logging.update(_logging(sup=[0.8, 0.6, 0.5], cons=[0.01, 0.02]))  # cons: epoch 2 not in yet
    logger.plot_progress_png(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['progress.png', 'progress_terms.png']  # no temporary file left
    for name in ('progress.png', 'progress_terms.png'):
        height, width = plt.imread(str(tmp_path / name)).shape[:2]
        assert width > 800 and height > 400
    # Before the first epoch ends there is nothing to draw, and nothing is written.
    empty = SemiSupervisedLocalLogger(('sup',))
    empty.my_fantastic_logging['train_sup'] = []
    empty.plot_progress_png(str(tmp_path / 'none'))   # the folder does not even exist


# ---------------------------------------------------------------------------------------------------------------
# in a trainer
def _trainer(ws, cls_name='nnUNetTrainerBCP'):
    import importlib
    module = {'nnUNetTrainerBCP': 'bcp', 'nnUNetTrainerMeanTeacher': 'mean_teacher'}[cls_name]
    cls = getattr(importlib.import_module(f'nnunetv2_semiseg.trainers.{module}'), cls_name)
    plans = json.load(open(os.path.join(ws.preprocessed, ws.plans + '.json')))
    plans['continue_training'] = False
    dataset_json = json.load(open(os.path.join(ws.preprocessed, 'dataset.json')))
    return cls(plans, '3d_fullres', 0, dataset_json, torch.device('cpu'))


def test_trainer_installs_the_logger(workspace, monkeypatch):
    workspace.set_process_env(monkeypatch)
    trainer = _trainer(workspace)
    local = trainer.logger.local_logger
    assert isinstance(local, SemiSupervisedLocalLogger)
    assert {'train_pretrain', 'train_inward', 'train_outward', 'train_losses'} <= set(local.my_fantastic_logging)
    assert dict(local.supervised_curve.weights) == {'pretrain': 1.0, 'inward': 0.5, 'outward': 0.5}


# Checked before the fixtures are built: without wandb the test costs nothing.
@pytest.mark.skipif(importlib.util.find_spec('wandb') is None, reason='wandb is not installed (pip install wandb)')
def test_terms_reach_weights_and_biases_offline(workspace, monkeypatch):
    from nnunetv2.training.logging import nnunet_logger
    workspace.set_process_env(monkeypatch)
    for key, value in {'nnUNet_wandb_enabled': '1', 'nnUNet_wandb_mode': 'offline', 'WANDB_SILENT': 'true',
                       'WANDB_CONSOLE': 'off'}.items():
        monkeypatch.setenv(key, value)
    sent = []
    original_log = nnunet_logger.WandbLogger.log

    def recording_log(self, key, value, step):
        sent.append((key, float(value), step))
        return original_log(self, key, value, step)

    monkeypatch.setattr(nnunet_logger.WandbLogger, 'log', recording_log)
    trainer = _trainer(workspace, 'nnUNetTrainerMeanTeacher')
    wandb_loggers = [lg for lg in trainer.logger.loggers if isinstance(lg, nnunet_logger.WandbLogger)]
    assert len(wandb_loggers) == 1
    try:
        for epoch, (sup, cons) in enumerate([((0.9, 0.7), (0.01, 0.03)), ((0.6, 0.4), (0.05, 0.07))]):
            trainer.current_epoch = epoch
            trainer.on_train_epoch_end([{'loss': sup[i] + 0.1 * cons[i], 'sup': sup[i], 'cons': cons[i]}
                                        for i in range(2)])
    finally:
        wandb_loggers[0].run.finish()
    # The epoch means, under the same keys as in the checkpoint's logging dict, one step per epoch.
    assert [(k, s) for k, _, s in sent] == [('train_losses', 0), ('train_sup', 0), ('train_cons', 0),
                                             ('train_losses', 1), ('train_sup', 1), ('train_cons', 1)]
    assert [v for k, v, _ in sent if k == 'train_sup'] == pytest.approx([0.8, 0.5])
    assert [v for k, v, _ in sent if k == 'train_cons'] == pytest.approx([0.02, 0.06])
    # wandb wrote them into the offline run (the .wandb file holds the history records uncompressed).
    runs = glob.glob(os.path.join(trainer.output_folder, 'wandb', 'offline-run-*', '*.wandb'))
    assert len(runs) == 1
    # wandb's service process may still be writing the file after finish() returns: wait for it (60 s at most).
    deadline = time.time() + 60
    while True:
        data = open(runs[0], 'rb').read()
        if (b'train_sup' in data and b'train_cons' in data) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert b'train_sup' in data and b'train_cons' in data
