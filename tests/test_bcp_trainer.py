"""nnUNetTrainerBCP: the wiring of both phases on tiny real networks (what the student sees, which rows and targets
each term uses, gradients), the phase switch, resuming on both sides of it, and end to
end through the stock CLIs on the tiny synthetic dataset (CPU)."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.losses.copy_paste import downsample_like_targets, region_weighted_dc_ce
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.bcp import (nnUNetTrainerBCP,
                                           nnUNetTrainerBCP_noLCC, nnUNetTrainerBCP_noPretrain,
                                           nnUNetTrainerBCP_oneDirection)
from nnunetv2_semiseg.trainers.bcp_components import (BCPTeacher, BidirectionalCopyPaste,
                                                      keep_largest_component_per_class)

DS_WEIGHTS = (2 / 3, 1 / 3)           # both levels weigh (nnU-Net's own weights give the lowest level 0)


# ----------------------------------------------------------------------------------------------------------------
# a trainer object holding only what compute_loss_terms reads, on a tiny 2D PlainConvUNet
# ----------------------------------------------------------------------------------------------------------------
def _network(num_outputs=2, seed=0):
    torch.manual_seed(seed)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (1, 1, 1), num_outputs, (1, 1), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    return SemiSegNetwork(base)


def _trainer(cls, labels=None, total_iterations=10, pretrain_fraction=None, network=None):
    t = object.__new__(cls)
    t.label_manager = LabelManager(labels or {'background': 0, 'fg': 1}, None)
    t.network = network if network is not None else _network(t.label_manager.num_segmentation_heads)
    t.device, t.is_ddp, t.enable_deep_supervision = torch.device('cpu'), False, True
    t.configuration_manager = SimpleNamespace(pool_op_kernel_sizes=[[1, 1], [2, 2], [2, 2]])
    t.global_iteration, t.num_epochs, t.num_iterations_per_epoch = 0, 1, total_iterations
    dc_ce = DC_and_CE_loss({'batch_dice': True, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                           dice_class=MemoryEfficientSoftDiceLoss)
    t.loss = DeepSupervisionWrapper(dc_ce, DS_WEIGHTS)
    if pretrain_fraction is not None:
        t.pretrain_fraction = pretrain_fraction
    t.copy_paste = BidirectionalCopyPaste(t.mask_beta, t.u_weight, t.keep_largest_component, t.bidirectional, 11)
    t.copy_paste.use_loss_pieces(**t.supervised_loss_pieces())
    t.teacher = BCPTeacher(t.unwrapped_network, t.ema_decay)
    t.print_to_log_file = lambda *args, **kwargs: None
    return t


def _batch(seed, n=2, shape=(16, 16), num_classes=2):
    g = torch.Generator().manual_seed(seed)
    x, u = torch.randn(n, 1, *shape, generator=g), torch.randn(n, 1, *shape, generator=g)
    y = torch.randint(0, num_classes, (n, 1, *shape), generator=g).to(torch.int16)  # differs from any prediction
    return x, downsample_like_targets(y, [[1, 1], [0.5, 0.5]]), u


def _expected_loss(network, x, target, regions):
    """Independent deep-supervised region loss: output of ``network(x)``, targets and masks by nearest-exact."""
    outputs = network(x)
    total = 0.0
    for k, w in enumerate(DS_WEIGHTS):
        size = outputs[k].shape[2:]
        t_k = F.interpolate(target.float(), size, mode='nearest-exact').long()
        regions_k = [(F.interpolate(r[None, None], size, mode='nearest-exact'), rw) for r, rw in regions]
        dice = MemoryEfficientSoftDiceLoss(apply_nonlin=lambda z: torch.softmax(z, 1), batch_dice=True,
                                           do_bg=False, smooth=1e-5, ddp=False)
        total = total + w * region_weighted_dc_ce(outputs[k], t_k, regions_k, dice)
    return total


def _recording(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach().clone()))
    return calls, handle


def test_pretraining_step_trains_on_two_mixed_labeled_patches_only():
    t = _trainer(nnUNetTrainerBCP, pretrain_fraction=0.5)
    x, target, u = _batch(0)
    student_calls, h1 = _recording(t.network.encoder)
    teacher_calls, h2 = _recording(t.teacher.teacher.encoder)
    terms = t.compute_loss_terms(x, target, {'data': u})
    h1.remove(), h2.remove()
    m = t.copy_paste.masks.mask((16, 16), 0)
    assert float((m == 0).sum()) == 11 * 11
    mixed = torch.where(m.bool(), x, x.roll(1, 0))
    assert len(student_calls) == 1 and torch.equal(student_calls[0], mixed)
    assert teacher_calls == [] and not t.teacher.initialised
    y = target[0]
    expected = _expected_loss(t.network, mixed, torch.where(m.bool(), y, y.roll(1, 0)), [(m, 1.0), (1 - m, 1.0)])
    assert terms['pretrain'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms['loss'] is terms['pretrain'] and terms['inward'].item() == 0 and terms['outward'].item() == 0


def test_self_training_step_rows_targets_weights_and_gradients():
    t = _trainer(nnUNetTrainerBCP, pretrain_fraction=0.0)
    t.teacher.initialise_from(_network(seed=5))          # a teacher whose pseudo-labels are not the student's
    t.global_iteration = 4
    x, target, u = _batch(1)
    student_calls, h1 = _recording(t.network.encoder)
    teacher_calls, h2 = _recording(t.teacher.teacher.encoder)
    terms = t.compute_loss_terms(x, target, {'data': u})
    h1.remove(), h2.remove()

    # the teacher sees the clean unlabeled patches; its pseudo-labels: p1 >= 0.5, largest component kept
    assert len(teacher_calls) == 1 and torch.equal(teacher_calls[0], u)
    with torch.no_grad():
        prob = torch.softmax(t.teacher.teacher(u), 1)[:, 1]
    p = torch.from_numpy(np.stack([keep_largest_component_per_class(r, [1]) for r in (prob >= 0.5).long().numpy()]))
    p = p[:, None]
    assert not torch.equal(p, (torch.softmax(t.network(u)[0], 1)[:, 1:] >= 0.5).long())

    m, y = t.copy_paste.masks.mask((16, 16), 4), target[0].long()
    keep = m.bool()
    x_in, y_in = torch.where(keep, x, u), torch.where(keep, y, p)
    x_out, y_out = torch.where(keep, u.roll(1, 0), x), torch.where(keep, p.roll(1, 0), y)
    assert len(student_calls) == 1 and torch.equal(student_calls[0], torch.cat((x_in, x_out)))
    # both directions are one student batch; batch Dice makes each direction's loss depend on its rows only
    net = t.network
    inward = _expected_loss(lambda z: [o[:2] for o in net(z)], torch.cat((x_in, x_out)), y_in, [(m, 1.0),
                                                                                              (1 - m, 0.5)])
    outward = _expected_loss(lambda z: [o[2:] for o in net(z)], torch.cat((x_in, x_out)), y_out, [(m, 0.5),
                                                                                                (1 - m, 1.0)])
    assert terms['inward'].item() == pytest.approx(inward.item(), rel=1e-5)
    assert terms['outward'].item() == pytest.approx(outward.item(), rel=1e-5)
    assert terms['loss'].item() == pytest.approx(inward.item() + outward.item(), rel=1e-5)
    assert terms['pretrain'].item() == 0

    terms['loss'].backward()
    assert [n for n, q in t.network.named_parameters() if q.grad is None] == []
    assert all(q.grad is None and not q.requires_grad for q in t.teacher.teacher.parameters())


def test_one_direction_variant_has_no_outward_patches():
    t = _trainer(nnUNetTrainerBCP_oneDirection, pretrain_fraction=0.0)
    x, target, u = _batch(2)
    calls, h = _recording(t.network.encoder)
    terms = t.compute_loss_terms(x, target, {'data': u})
    h.remove()
    m = t.copy_paste.masks.mask((16, 16), 0)
    assert len(calls) == 1 and torch.equal(calls[0], torch.where(m.bool(), x, u))
    assert terms['outward'].item() == 0 and terms['loss'].item() == terms['inward'].item() > 0
    assert nnUNetTrainerBCP_oneDirection.loss_term_names == ('pretrain', 'inward')


def test_variants_change_one_thing_each():
    assert nnUNetTrainerBCP.pretrain_fraction == pytest.approx(2000 / 17000)
    assert nnUNetTrainerBCP_noPretrain.pretrain_fraction == 0
    assert _trainer(nnUNetTrainerBCP_noPretrain).switch_step() == 0
    assert _trainer(nnUNetTrainerBCP, total_iterations=17000).switch_step() == 2000
    assert _trainer(nnUNetTrainerBCP_noLCC).copy_paste.keep_largest_component is False
    assert _trainer(nnUNetTrainerBCP).copy_paste.keep_largest_component is True


def test_multiclass_with_ignore_label_step():
    labels = {'background': 0, 'a': 1, 'b': 2, 'ignore': 3}
    t = _trainer(nnUNetTrainerBCP, labels=labels, pretrain_fraction=0.0)
    assert t.copy_paste.ignore_label == 3
    x, target, u = _batch(3, num_classes=4)      # labels 0..3: 3 = ignore
    terms = t.compute_loss_terms(x, target, {'data': u})
    assert torch.isfinite(terms['loss']) and terms['inward'].item() > 0 and terms['outward'].item() > 0
    terms['loss'].backward()
    assert [n for n, q in t.network.named_parameters() if q.grad is None] == []


def test_phase_switch_initialises_the_teacher_once_at_the_configured_step():
    t = _trainer(nnUNetTrainerBCP, total_iterations=6, pretrain_fraction=0.5)
    assert t.switch_step() == 3
    optimizer = torch.optim.SGD(t.network.parameters(), lr=0.1)
    initialisations = []
    original = t.teacher.initialise_from
    t.teacher.initialise_from = lambda s: (initialisations.append(t.global_iteration), original(s))
    key = 'decoder.seg_layers.0.weight'
    for step in range(6):
        x, target, u = _batch(10 + step)
        optimizer.zero_grad()
        terms = t.compute_loss_terms(x, target, {'data': u})
        if step < 3:
            assert terms['pretrain'].item() > 0 and terms['inward'].item() == 0 and not t.teacher.initialised
        else:
            assert terms['pretrain'].item() == 0 and terms['inward'].item() > 0
        before = t.network.state_dict()[key].clone()
        if step == 3:
            assert torch.equal(t.teacher.teacher.state_dict()[key], before)
        terms['loss'].backward()
        optimizer.step()
        t.global_iteration += 1
        t.after_optimizer_step()
        if step == 3:
            after = t.network.state_dict()[key]
            assert not torch.equal(after, before)
            assert torch.allclose(t.teacher.teacher.state_dict()[key], 0.99 * before + 0.01 * after, atol=1e-7)
    assert initialisations == [3]


def test_switch_checkpoint_is_written_only_when_asked_and_holds_the_teachers_start(monkeypatch, tmp_path):
    """nnUNet_semiseg_bcp_switch_checkpoint=1: one checkpoint_switch.pth, at the switch step, with the student
    weights the teacher is initialised from (before that step's optimizer update); unset: none."""
    from nnunetv2_semiseg.trainers.schedule import SWITCH_CHECKPOINT_ENV_VAR
    key = 'decoder.seg_layers.0.weight'
    for asked in (False, True):
        if asked:
            monkeypatch.setenv(SWITCH_CHECKPOINT_ENV_VAR, '1')
        else:
            monkeypatch.delenv(SWITCH_CHECKPOINT_ENV_VAR, raising=False)
        t = _trainer(nnUNetTrainerBCP, total_iterations=4, pretrain_fraction=0.5)
        t.output_folder = str(tmp_path)
        saved = []
        t.save_checkpoint = lambda filename: saved.append(
            (filename, t.global_iteration, t.network.state_dict()[key].clone()))
        optimizer = torch.optim.SGD(t.network.parameters(), lr=0.1)
        before_step = []
        for step in range(4):
            x, target, u = _batch(20 + step)
            before_step.append(t.network.state_dict()[key].clone())
            optimizer.zero_grad()
            t.compute_loss_terms(x, target, {'data': u})['loss'].backward()
            optimizer.step()
            t.global_iteration += 1
            t.after_optimizer_step()
        if not asked:
            assert saved == []
            continue
        assert len(saved) == 1
        filename, step, weights = saved[0]
        assert filename == os.path.join(str(tmp_path), 'checkpoint_switch.pth') and step == 2
        assert torch.equal(weights, before_step[2]) and not torch.equal(weights, before_step[3])


# ----------------------------------------------------------------------------------------------------------------
# resume on both sides of the boundary: a resumed run equals the uninterrupted one (real trainer, tiny 2d plans)
# ----------------------------------------------------------------------------------------------------------------
class _HalfPretrainBCP(nnUNetTrainerBCP):
    pretrain_fraction = 0.5


def test_resume_before_and_after_the_switch_equals_the_uninterrupted_run(workspace, monkeypatch):
    ws = workspace
    ws.set_process_env(monkeypatch)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = load_json(os.path.join(ws.preprocessed, ws.plans + '.json'))
    dataset_json = load_json(os.path.join(ws.preprocessed, 'dataset.json'))

    def make():
        p = dict(plans)
        p['continue_training'] = False
        t = _HalfPretrainBCP(p, '2d', 0, dataset_json, torch.device('cpu'))
        t.num_epochs, t.num_iterations_per_epoch = 1, 4          # switch at step 2
        t.initialize()
        return t

    def step(t, i):
        # 16x16 rather than the plans' 32x32 patch: the network takes any multiple of 4 and the test runs faster
        x, target, u = _batch(20 + i, n=t.batch_size, shape=(16, 16))
        target = downsample_like_targets(target[0], t._get_deep_supervision_scales())
        t.next_unlabeled_batch = lambda: {'data': u}
        t.train_step({'data': x, 'target': target})

    a = make()
    step(a, 0)
    before_switch = os.path.join(a.output_folder, 'before_switch.pth')
    a.save_checkpoint(before_switch)
    step(a, 1)
    step(a, 2)
    after_switch = os.path.join(a.output_folder, 'after_switch.pth')
    a.save_checkpoint(after_switch)
    step(a, 3)

    b = make()
    b.copy_paste.masks.seed = a.copy_paste.masks.seed + 1          # the checkpoint's seed must replace it
    b.load_checkpoint(before_switch)
    assert b.global_iteration == 1 and not b.teacher.initialised
    assert b.copy_paste.masks.seed == a.copy_paste.masks.seed
    for i in range(1, 4):
        step(b, i)
    c = make()
    c.copy_paste.masks.seed = a.copy_paste.masks.seed + 1
    c.load_checkpoint(after_switch)
    assert c.global_iteration == 3 and c.teacher.initialised
    step(c, 3)
    for other in (b, c):
        for key, value in a.unwrapped_network.state_dict().items():
            assert torch.allclose(other.unwrapped_network.state_dict()[key], value, atol=1e-6), key
        for key, value in a.teacher.teacher.state_dict().items():
            assert torch.allclose(other.teacher.teacher.state_dict()[key], value, atol=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# End to end through the stock CLIs (tiny synthetic dataset from conftest, CPU)
# ----------------------------------------------------------------------------------------------------------------
def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _train(ws, configuration, epochs, iterations, *extra):
    ws.run('nnUNetv2_train', str(ws.dataset_id), configuration, '0', '-tr', 'nnUNetTrainerBCP', '-p', ws.plans,
           '-device', 'cpu', *extra, env=ws.train_env(epochs=epochs, iterations=iterations))


def _predict(ws, configuration, out):
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', str(ws.dataset_id),
           '-c', configuration, '-f', '0', '-tr', 'nnUNetTrainerBCP', '-p', ws.plans, '-device', 'cpu', '-npp', '0',
           '-nps', '0', '--disable_tta')
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['test_000.nii.gz', 'test_001.nii.gz']


def _strictly_loaded_network(model_folder):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (0,), 'checkpoint_final.pth')  # strict
    network = predictor.network.eval()
    network.patch_size = tuple(predictor.configuration_manager.patch_size)
    return network


def test_bcp_3d_across_the_boundary_resume_predict_export(workspace, tmp_path):
    ws = workspace
    # 1 epoch of 5 steps: switch at round(2000/17000 * 5) = 1, so step 0 pre-trains and steps 1-4 self-train
    _train(ws, '3d_fullres', 1, 5)
    fold = os.path.join(ws.model_folder('nnUNetTrainerBCP'), 'fold_0')
    first = _load(os.path.join(fold, 'checkpoint_final.pth'))
    state = first['semiseg']
    assert state['global_iteration'] == 5 and state['bcp_teacher']['initialised'] is True
    assert set(state['bcp_teacher']['weights']) == set(first['network_weights'])
    # the full-resolution segmentation layer: nnU-Net gives the lowest deep-supervision output weight 0, so that
    # layer (seg_layers.0 here) never trains and its EMA equals the student up to rounding
    key = max((k for k in first['network_weights'] if k.startswith('decoder.seg_layers.') and k.endswith('.weight')),
              key=lambda k: int(k.split('.')[2]))
    assert not torch.equal(state['bcp_teacher']['weights'][key], first['network_weights'][key])
    log = first['logging']
    assert log['train_pretrain'][0] > 0 and log['train_inward'][0] != 0 and log['train_outward'][0] != 0
    logs = ''.join(open(os.path.join(fold, f)).read() for f in os.listdir(fold) if f.startswith('training_log'))
    assert logs.count('BCP: self-training starts at step 1; teacher initialised from the student.') == 1
    assert os.path.isfile(os.path.join(fold, 'progress_terms.png'))

    # --c to 2 epochs (switch at round(1.18) = 1 again): self-training continues with the restored teacher and seed
    _train(ws, '3d_fullres', 2, 5, '--c')
    resumed = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert resumed['semiseg']['global_iteration'] == 10
    assert resumed['semiseg']['bcp_mask'] == state['bcp_mask']
    log = resumed['logging']
    assert log['train_pretrain'][0] == pytest.approx(first['logging']['train_pretrain'][0])
    assert log['train_pretrain'][1] == 0 and log['train_inward'][1] != 0 and log['train_outward'][1] != 0
    logs = ''.join(open(os.path.join(fold, f)).read() for f in os.listdir(fold) if f.startswith('training_log'))
    assert logs.count('teacher initialised from the student') == 1          # not again after --c

    _predict(ws, '3d_fullres', str(tmp_path / 'pred'))
    plain_folder = ws.model_folder('nnUNetTrainer')
    ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder('nnUNetTrainerBCP'), '-o', plain_folder)
    plain, ours = _strictly_loaded_network(plain_folder), _strictly_loaded_network(ws.model_folder('nnUNetTrainerBCP'))
    x = torch.randn(1, 1, *ours.patch_size)
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))


def test_bcp_2d_trains_resumes_and_predicts(workspace, tmp_path):
    ws = workspace
    _train(ws, '2d', 1, 2)                       # switch at round(0.24) = 0: self-training from the first step
    fold = os.path.join(ws.model_folder('nnUNetTrainerBCP', '2d'), 'fold_0')
    first = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert first['logging']['train_pretrain'] == [0.0] and first['logging']['train_inward'][0] > 0
    _train(ws, '2d', 2, 2, '--c')
    resumed = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert resumed['semiseg']['global_iteration'] == 4 and len(resumed['logging']['train_outward']) == 2
    _predict(ws, '2d', str(tmp_path / 'pred'))
