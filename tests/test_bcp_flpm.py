"""nnUNetTrainerBCPFLPM: which rows SFPC's L_u reads in each BCP phase (against an independent computation on a tiny
real PlainConvUNet), its weight, the gradients (student yes, teacher no), and one run through the stock CLIs.

The network has two convolution blocks per decoder stage, so the penultimate feature and the last decoder feature
have the same channel count: feeding the wrong one (or the wrong rows) fails by value, not by shape.
"""
import math
import os

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
from nnunetv2_semiseg.trainers.bcp_flpm import nnUNetTrainerBCPFLPM
from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency

from test_bcp_trainer import _batch, _trainer
from test_flpm_wiring import sfpc_by_hand

SEED = 11


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _network(seed=0):
    torch.manual_seed(seed)
    base = PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (2, 2, 2), 2, (2, 2), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)
    with torch.no_grad():      # confident logits: the perturbations' effect on the probabilities is well measurable
        base.decoder.seg_layers[-1].weight.mul_(10.0)
    return SemiSegNetwork(base)


def _bcp_flpm(pretrain_fraction, global_iteration=5, total=10):
    t = _trainer(nnUNetTrainerBCPFLPM, total_iterations=total, pretrain_fraction=pretrain_fraction,
                 network=_network())
    t.global_iteration = global_iteration
    t.feature_consistency = FeaturePerturbedConsistency()          # the trainer's defaults (initialize())
    t.feature_consistency.perturbation.generator = torch.Generator().manual_seed(SEED)
    return t


def _expected_consistency(network, rows):
    """SFPC Eq. 1-5 by hand on ``rows``: the penultimate feature from a hook on the stock last decoder block, batch
    spread over exactly these rows, M = 4 epsilons drawn as the trainer draws them, entropy weights, L2 norm."""
    seen = {}
    last_block = network.decoder.stages[-1].convs[-1]
    handle = last_block.register_forward_pre_hook(lambda module, args: seen.setdefault('f', args[0]))
    with torch.no_grad():
        network.decoder(network.encoder(rows))
        handle.remove()
        f = seen['f'].double()
    return sfpc_by_hand(f, lambda g: network.decoder.seg_layers[-1](last_block(g)), seed=SEED)[0]


def _student_inputs(t):
    calls = []
    handle = t.network.encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach().clone()))
    return calls, handle


def test_self_training_fpc_reads_all_mixed_rows_with_sfpc_weight_and_trains_only_the_student():
    t = _bcp_flpm(pretrain_fraction=0.0, global_iteration=5)            # t = 0.5: lambda_1 = 0.1 exp(-5/4)
    t.teacher.initialise_from(_network(seed=5))
    x, target, u = _batch(1, n=3)                                       # 3 + 3 rows: 6 mixed rows
    calls, handle = _student_inputs(t)
    terms = t.compute_loss_terms(x, target, {'data': u})
    handle.remove()
    # the student runs once, on the 6 mixed rows (inward then outward) - and the FLPM term reads exactly those
    assert len(calls) == 1 and calls[0].shape[0] == 6
    mixed = calls[0]
    m = t.copy_paste.masks.mask((16, 16), 5).bool()
    assert torch.equal(mixed[:3], torch.where(m, x, u)) and torch.equal(mixed[3:], torch.where(m, u.roll(1, 0), x))
    expected = _expected_consistency(t.network, mixed)
    assert terms["fpc"].item() == pytest.approx(expected, rel=1e-3) and expected > 1e-5
    # wrong rows give other values: the clean unlabeled rows, or the inward half only
    t.feature_consistency.perturbation.generator = torch.Generator().manual_seed(SEED)
    assert _expected_consistency(t.network, u) != pytest.approx(expected, rel=1e-2)
    assert _expected_consistency(t.network, mixed[:3]) != pytest.approx(expected, rel=1e-2)

    # the BCP terms are unchanged by the added term (same as nnUNetTrainerBCP on the same batch and weights)
    plain = _trainer(nnUNetTrainerBCP, total_iterations=10, pretrain_fraction=0.0, network=t.network)
    plain.global_iteration, plain.teacher = 5, t.teacher
    bcp_terms = plain.compute_loss_terms(x, target, {'data': u})
    for name in ('inward', 'outward'):
        assert terms[name].item() == pytest.approx(bcp_terms[name].item(), rel=1e-6)
    weight = 0.1 * math.exp(-5 * 0.5 ** 2)
    assert terms['loss'].item() == pytest.approx(bcp_terms['inward'].item() + bcp_terms['outward'].item()
                                                 + weight * expected, rel=1e-5)
    assert terms['pretrain'].item() == 0

    # gradient of L_u alone reaches the student's decoder (through the perturbed copies) and never the teacher
    t.network.zero_grad()
    terms['fpc'].backward()
    grads = {n: q.grad for n, q in t.network.named_parameters()}
    assert grads['decoder.stages.1.convs.1.conv.weight'].abs().sum() > 0       # the re-run last block
    assert grads['decoder.seg_layers.1.weight'].abs().sum() > 0
    assert all(q.grad is None and not q.requires_grad for q in t.teacher.teacher.parameters())


def test_pretraining_has_no_fpc_term_and_equals_bcp():
    t = _bcp_flpm(pretrain_fraction=0.5, global_iteration=0)
    x, target, u = _batch(0)
    terms = t.compute_loss_terms(x, target, {'data': u})
    plain = _trainer(nnUNetTrainerBCP, total_iterations=10, pretrain_fraction=0.5, network=t.network)
    expected = plain.compute_loss_terms(x, target, {'data': u})
    assert terms['fpc'].item() == 0 and terms['inward'].item() == 0 and terms['outward'].item() == 0
    assert expected['pretrain'].item() > 0
    assert terms['loss'].item() == pytest.approx(expected['pretrain'].item(), rel=1e-6)
    assert not t.teacher.initialised


def test_defaults_are_the_two_papers():
    assert nnUNetTrainerBCPFLPM.pretrain_fraction == nnUNetTrainerBCP.pretrain_fraction
    assert nnUNetTrainerBCPFLPM.consistency_weight == 0.1 and nnUNetTrainerBCPFLPM.num_perturbations == 4
    assert nnUNetTrainerBCPFLPM.perturbation_tau == 0.1 and nnUNetTrainerBCPFLPM.consistency_ramp_length == 1.0
    assert nnUNetTrainerBCPFLPM.loss_term_names == ('pretrain', 'inward', 'outward', 'fpc')


def test_bcp_flpm_3d_through_the_stock_cli(workspace, tmp_path):
    ws = workspace
    trainer = 'nnUNetTrainerBCPFLPM'
    # 1 epoch of 3 steps: switch at round(2000/17000 * 3) = 0, so every step self-trains
    ws.run('nnUNetv2_train', str(ws.dataset_id), '3d_fullres', '0', '-tr', trainer, '-p', ws.plans, '-device',
           'cpu', env=ws.train_env(epochs=1, iterations=3))
    fold = os.path.join(ws.model_folder(trainer), 'fold_0')
    final = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    log = final['logging']
    assert log['train_fpc'][0] > 0 and log['train_inward'][0] > 0 and log['train_outward'][0] > 0
    assert final['semiseg']['bcp_teacher']['initialised'] is True
    assert not any(k.startswith('heads.') for k in final['network_weights'])
    out = str(tmp_path / 'pred')
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', str(ws.dataset_id),
           '-c', '3d_fullres', '-f', '0', '-tr', trainer, '-p', ws.plans, '-device', 'cpu', '-npp', '0',
           '-nps', '0', '--disable_tta')
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['test_000.nii.gz', 'test_001.nii.gz']


def test_epoch_weights_follow_the_phase_and_sfpc_ramp_and_the_set_up_names_the_switch():
    # 10 steps, pre-training for round(0.3 * 10) = 3 of them (steps 0-2). The weight reported at an epoch's end is
    # the weight of its last step, global_iteration - 1.
    t = _bcp_flpm(pretrain_fraction=0.3, global_iteration=3)                # last step 2: still pre-training
    assert t.current_term_weights() == {'pretrain': 1.0, 'inward': 0.0, 'outward': 0.0, 'fpc': 0.0}
    t.global_iteration = 4                                                   # last step 3: the first self-training
    assert t.current_term_weights() == pytest.approx({'pretrain': 0.0, 'inward': 1.0, 'outward': 1.0,
                                                      'fpc': 0.1 * math.exp(-5 * (1 - 0.3) ** 2)})
    t.global_iteration = 10                                                  # last step 9: t = 0.9
    assert t.current_term_weights()['fpc'] == pytest.approx(0.1 * math.exp(-5 * 0.1 ** 2))
    lines = t.term_weight_lines()
    assert lines[0] == 'Loss term pretrain: labeled-only copy-paste (both patches ground truth), weight 1 for ' \
                       'steps 0-2 (0.3 of 10 steps), then 0.'
    assert lines[1].startswith('Loss terms inward / outward: ') and 'from step 3 on' in lines[1] and \
        'u_weight=0.5' in lines[1]
    assert lines[2].startswith('Loss term fpc: ') and 'weight 0.1, sigmoid ramp' in lines[2]


def test_plain_bcp_reports_phase_weights_for_its_own_terms_only():
    from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP_oneDirection
    t = _trainer(nnUNetTrainerBCP_oneDirection, total_iterations=10, pretrain_fraction=0.3)
    t.global_iteration = 5
    assert t.current_term_weights() == {'pretrain': 0.0, 'inward': 1.0}
    assert t.term_weight_lines()[1].startswith('Loss terms inward: ')
