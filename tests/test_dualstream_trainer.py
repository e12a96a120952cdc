"""nnUNetTrainerDualStream: streams built from a plan, the loss wiring on tiny real networks (rows, targets,
stop-gradients, weights), the released-code objective against a hand computation, and end to end through the
stock CLIs (3D: train, --c, strict ensemble predict, plain export of both streams; 2D: train, predict, export B)."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunetv2_semiseg.networks.dualstream import (DualStreamNetwork, UnsupportedArchitectureError, stream_plans,
                                                  stream_state_dict)
from nnunetv2_semiseg.trainers.dualstream import (nnUNetTrainerDualStream,
                                                  nnUNetTrainerDualStream_noContrast,
                                                  nnUNetTrainerDualStream_releasedCode,
                                                  nnUNetTrainerDualStream_resEncM)
from nnunetv2_semiseg.trainers.dualstream_components import (A_TEACHES_B, CosineConsistency,
                                                             EntropyFilteredPseudoLabels, PrototypeContrast,
                                                             UncertaintyWeightedPseudoLabels)

REQ_IMPORT = ['conv_op', 'norm_op', 'dropout_op', 'nonlin']


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def _plain_kwargs(dim: int) -> dict:
    conv = 'torch.nn.modules.conv.Conv2d' if dim == 2 else 'torch.nn.modules.conv.Conv3d'
    norm = 'torch.nn.modules.instancenorm.InstanceNorm2d' if dim == 2 else \
        'torch.nn.modules.instancenorm.InstanceNorm3d'
    return {'n_stages': 3, 'features_per_stage': [4, 8, 16], 'conv_op': conv, 'kernel_sizes': [[3] * dim] * 3,
            'strides': [[1] * dim, [2] * dim, [2] * dim], 'n_conv_per_stage': [2, 2, 2],
            'n_conv_per_stage_decoder': [1, 1], 'conv_bias': True, 'norm_op': norm,
            'norm_op_kwargs': {'eps': 1e-5, 'affine': True}, 'dropout_op': None, 'dropout_op_kwargs': None,
            'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True}}


def _configuration(dim: int = 2, class_name: str = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'):
    return SimpleNamespace(network_arch_class_name=class_name, network_arch_init_kwargs=_plain_kwargs(dim),
                           network_arch_init_kwargs_req_import=REQ_IMPORT)


def _network(cls=nnUNetTrainerDualStream, dim: int = 2, num_outputs: int = 3) -> DualStreamNetwork:
    return cls.build_network_architecture(None, _configuration(dim), 1, num_outputs, enable_deep_supervision=True)


def _ce_stand_in(seg_outputs, target):
    # Stand-in for nnU-Net's DC+CE that really reads the target: CE of the full-resolution output (the lower
    # outputs join with weight 0, as nnU-Net's lowest-resolution output does, so every seg layer gets a gradient).
    return torch.nn.functional.cross_entropy(seg_outputs[0].float(), target[0][:, 0].long()) + \
        sum(s.float().sum() * 0.0 for s in seg_outputs[1:])


def _loss_only_trainer(cls, network, labels=None):
    trainer = object.__new__(cls)
    trainer.label_manager = LabelManager(labels or {'background': 0, 'a': 1, 'b': 2}, None)
    trainer.network = network
    trainer.device = torch.device('cpu')
    trainer.loss = _ce_stand_in
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 1, 10   # t = 0.5
    trainer.loss_components = trainer.build_loss_components()
    return trainer


def _batch(seed=0, classes=3, size=16):
    g = torch.Generator().manual_seed(seed)
    data, unlabeled = torch.randn(2, 1, size, size, generator=g), torch.randn(2, 1, size, size, generator=g)
    target = torch.randint(0, classes, (2, 1, size, size), generator=g).float()
    return data, [target, target[..., ::2, ::2]], unlabeled


# ----------------------------------------------------------------------------------------------------------------
# streams from one plan
# ----------------------------------------------------------------------------------------------------------------
def test_streams_follow_the_plan_and_the_deployed_forward_is_the_ensemble():
    net = _network()
    a, b = net.stream_a, net.stream_b
    assert type(a.encoder).__name__ == 'PlainConvEncoder' and type(b.encoder).__name__ == 'ResidualEncoder'
    assert a.encoder.output_channels == b.encoder.output_channels == [4, 8, 16]
    assert [len(s.blocks) for s in b.encoder.stages] == [1, 1, 1]
    assert [s[0].convs[0].conv.stride for s in a.encoder.stages] == [(1, 1), (2, 2), (2, 2)]
    deeper = _network(nnUNetTrainerDualStream_resEncM)
    assert [len(s.blocks) for s in deeper.stream_b.encoder.stages] == [1, 3, 4]
    x = torch.randn(2, 1, 16, 16)
    net.set_deep_supervision(False)
    with torch.no_grad():
        out = net(x)
        expected = torch.log((torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2)
    assert torch.allclose(out, expected, atol=1e-6)
    net.set_deep_supervision(True)
    assert isinstance(net(x), list) and len(net(x)) == 2          # one output per decoder stage


def test_non_plain_plans_are_refused_with_the_reason():
    with pytest.raises(UnsupportedArchitectureError, match='ResidualEncoderUNet.*nnUNetPlans'):
        nnUNetTrainerDualStream.build_network_architecture(
            None, _configuration(2, 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'), 1, 3)


def test_stream_export_helpers_give_stock_loadable_weights_and_plans():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    net = _network(nnUNetTrainerDualStream_resEncM, dim=3, num_outputs=2)
    weights = net.state_dict()
    plans = {'dataset_name': 'D', 'plans_name': 'P', 'configurations': {'3d_fullres': {
        'architecture': {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
                         'arch_kwargs': _plain_kwargs(3), '_kw_requires_import': REQ_IMPORT}}}}
    for stream, module in (('A', net.stream_a), ('B', net.stream_b)):
        cm = PlansManager(stream_plans(plans, '3d_fullres', stream, weights)).get_configuration('3d_fullres')
        stock = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                       cm.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False)
        stock.load_state_dict(stream_state_dict(weights, stream))        # strict
        assert torch.equal(stock.state_dict()['decoder.seg_layers.1.weight'],
                           module.decoder.seg_layers[1].weight.detach())
    assert stream_plans(plans, '3d_fullres', 'B', weights)['configurations']['3d_fullres']['architecture'][
        'arch_kwargs']['n_blocks_per_stage'] == [1, 3, 4]
    assert plans['configurations']['3d_fullres']['architecture']['network_class_name'].endswith('PlainConvUNet')


# ----------------------------------------------------------------------------------------------------------------
# loss wiring
# ----------------------------------------------------------------------------------------------------------------
def test_supervised_rows_and_targets_and_the_ramped_total():
    torch.manual_seed(0)
    trainer = _loss_only_trainer(nnUNetTrainerDualStream, _network())
    data, target, unlabeled = _batch()
    terms = trainer.compute_loss_terms(data, target, {'data': unlabeled})
    assert set(terms) == {'loss', 'sup', 'pseudo', 'uncertainty', 'consistency', 'contrast'}
    with torch.no_grad():
        streams = trainer.network.forward_streams(data)
    expected_sup = sum(torch.nn.functional.cross_entropy(streams[s]['seg'][0], target[0][:, 0].long())
                       for s in 'AB')
    assert terms['sup'].item() == pytest.approx(expected_sup.item(), rel=1e-5)
    lam = 0.1 * math.exp(-5 * (1 - 0.5) ** 2)
    unsupervised = sum(terms[k].item() for k in ('pseudo', 'uncertainty', 'consistency', 'contrast'))
    assert terms['loss'].item() == pytest.approx(terms['sup'].item() + lam * unsupervised, rel=1e-5)
    terms['loss'].backward()
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []   # DDP: every parameter


def test_pseudo_label_terms_read_only_unlabeled_rows_consistency_reads_all():
    torch.manual_seed(0)
    trainer = _loss_only_trainer(nnUNetTrainerDualStream, _network())
    data, target, unlabeled = _batch()
    with torch.no_grad():
        base = trainer.compute_loss_terms(data, target, {'data': unlabeled})
        other_labeled = trainer.compute_loss_terms(data + 3.0 * torch.randn_like(data), target, {'data': unlabeled})
        other_unlabeled = trainer.compute_loss_terms(data, target, {'data': unlabeled.flip(-1) * 2})
    for term in ('pseudo', 'uncertainty', 'contrast'):
        assert other_labeled[term].item() == pytest.approx(base[term].item(), rel=1e-6)
        assert other_unlabeled[term].item() != pytest.approx(base[term].item(), rel=1e-3)
    assert other_labeled['consistency'].item() != pytest.approx(base['consistency'].item(), rel=1e-3)
    assert other_unlabeled['sup'].item() == pytest.approx(base['sup'].item(), rel=1e-6)


def _grad_norms(network, component):
    data, target, unlabeled = _batch(seed=3)
    network.zero_grad(set_to_none=True)
    trainer = _loss_only_trainer(nnUNetTrainerDualStream, network)
    context = trainer.make_context(network, torch.cat((data, unlabeled)), target, 2)
    component.loss(context).backward()

    def norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
    return norm(network.stream_a), norm(network.stream_b), norm(network.stream_b.decoder.stages[-1])


@pytest.mark.parametrize('component', [
    EntropyFilteredPseudoLabels(1.0, None, directions=A_TEACHES_B),
    UncertaintyWeightedPseudoLabels(1.0, None, directions=A_TEACHES_B),
    PrototypeContrast(1.0, None, num_classes=3, directions=A_TEACHES_B)], ids=lambda c: c.name)
def test_teaching_stream_is_detached_learning_stream_gets_gradient(component):
    torch.manual_seed(0)
    grad_a, grad_b, grad_b_last_stage = _grad_norms(_network(), component)
    assert grad_a == 0.0                      # A teaches: its prediction (labels, entropy) is a constant
    assert grad_b > 0 and grad_b_last_stage > 0   # B's logits / last-decoder features carry the gradient


def test_cosine_consistency_trains_both_streams():
    torch.manual_seed(0)
    grad_a, grad_b, _ = _grad_norms(_network(), CosineConsistency(1.0, None))
    assert grad_a > 0 and grad_b > 0


def test_ablation_drops_its_term():
    torch.manual_seed(0)
    trainer = _loss_only_trainer(nnUNetTrainerDualStream_noContrast, _network())
    data, target, unlabeled = _batch()
    assert 'contrast' not in trainer.compute_loss_terms(data, target, {'data': unlabeled})


# ----------------------------------------------------------------------------------------------------------------
# the released code's objective, by hand
# ----------------------------------------------------------------------------------------------------------------
def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_released_code_variant_reproduces_the_hand_computed_objective():
    torch.manual_seed(0)
    net = _network(nnUNetTrainerDualStream_releasedCode, num_outputs=2)
    with torch.no_grad():
        for stream in (net.stream_a, net.stream_b):   # confident outputs, so the mistake mask is not empty
            for layer in stream.decoder.seg_layers:
                layer.weight.mul_(6.0)
    trainer = _loss_only_trainer(nnUNetTrainerDualStream_releasedCode, net, {'background': 0, 'fg': 1})
    data, target, unlabeled = _batch(seed=1, classes=2)
    terms = trainer.compute_loss_terms(data, target, {'data': unlabeled})
    assert set(terms) == {'loss', 'sup', 'uncertainty', 'consistency', 'mistake'}

    with torch.no_grad():
        streams = net.forward_streams(torch.cat((data, unlabeled)))
    za, zb = (streams[s]['seg'][0].double().numpy() for s in 'AB')
    pa, pb = _softmax(za), _softmax(zb)
    y = target[0][:, 0].numpy().astype(int)
    onehot = np.stack((y == 0, y == 1), 1)
    conf_a = (pa[:2].argmax(1) == 1) & (pa[:2].max(1) >= 0.6)
    conf_b = (pb[:2].argmax(1) == 1) & (pb[:2].max(1) >= 0.6)
    mask = conf_a ^ conf_b
    assert mask.sum() > 0
    total = 0.0
    for p in (pa[:2], pb[:2]):
        ce = -np.log((p * onehot).sum(1)).mean()
        dice = 1 - (2 * (p[:, 1] * (y == 1)).sum() + 1e-5) / ((p[:, 1] ** 2).sum() + (y == 1).sum() + 1e-5)
        mistake = (mask * (p[:, 1] - (y == 1)) ** 2).sum() / (mask.sum() + 1e-16)
        total += ce + dice + 0.5 * mistake
    pseudo = za.argmax(1)                                       # A ("V-Net") teaches B on all rows
    kl = (pa * (np.log(pa) - np.log(pb))).sum(1)
    ce_b = -np.log(np.take_along_axis(pb, pseudo[:, None], 1)[:, 0])
    lurp = np.mean(np.exp(-kl) * ce_b) + np.mean(kl)
    cos = np.mean(1 - (pa * pb).sum(1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1)))
    total += lurp + cos
    assert terms['uncertainty'].item() == pytest.approx(lurp, rel=1e-4)
    assert terms['loss'].item() == pytest.approx(total, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# end to end through the stock CLIs
# ----------------------------------------------------------------------------------------------------------------
TRAINER = 'nnUNetTrainerDualStream'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _train(ws, configuration, epochs, *extra):
    ws.run('nnUNetv2_train', str(ws.dataset_id), configuration, '0', '-tr', TRAINER, '-p', ws.plans, '-device',
           'cpu', *extra, env=ws.train_env(epochs=epochs, iterations=2))


def _predict(ws, out, trainer, configuration='3d_fullres'):
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', str(ws.dataset_id), '-c',
           configuration, '-f', '0', '-tr', trainer, '-p', ws.plans, '-device', 'cpu', '-npp', '0', '-nps', '0',
           '--disable_tta', '--save_probabilities')


def _probabilities(folder, case='test_000'):
    return np.load(os.path.join(folder, f'{case}.npz'))['probabilities']


def test_3d_train_resume_predict_ensemble_export_both_streams(workspace, tmp_path):
    ws = workspace
    _train(ws, '3d_fullres', 1)
    model = ws.model_folder(TRAINER)
    final = _load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'))
    keys = set(final['network_weights'])
    assert any(k.startswith('stream_a.encoder.') for k in keys) and any(k.startswith('stream_b.encoder.stages.0.'
                                                                                     'blocks.0.') for k in keys)
    assert final['semiseg']['global_iteration'] == 2
    for term in ('sup', 'pseudo', 'uncertainty', 'consistency', 'contrast'):
        assert len(final['logging'][f'train_{term}']) == 1 and np.isfinite(final['logging'][f'train_{term}'][0])
    # one optimizer over both streams. Unique tensors = parameters (the state dict repeats shared modules, e.g.
    # decoder.encoder.*; InstanceNorm has no buffers; the one buffer is the region_ensemble flag). Momentum buffers
    # exist for all but the two streams' lowest-resolution seg layers (weight + bias each), to which nnU-Net's deep
    # supervision gives weight 0 outside DDP.
    assert int(final['network_weights']['region_ensemble']) == 0            # softmax dataset: softmax ensemble
    num_params = len({v.data_ptr() for k, v in final['network_weights'].items() if k != 'region_ensemble'})
    assert num_params > len({v.data_ptr() for k, v in final['network_weights'].items() if k.startswith('stream_a.')})
    assert len(final['optimizer_state']['param_groups'][0]['params']) == num_params
    assert len(final['optimizer_state']['state']) == num_params - 4

    _train(ws, '3d_fullres', 2, '--c')
    resumed = _load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'))
    assert resumed['current_epoch'] == 2 and resumed['semiseg']['global_iteration'] == 4
    assert resumed['logging']['train_sup'][0] == pytest.approx(final['logging']['train_sup'][0])
    for key in ('stream_a.decoder.seg_layers.1.weight', 'stream_b.decoder.seg_layers.1.weight'):
        assert not torch.equal(resumed['network_weights'][key], final['network_weights'][key])
    assert len(resumed['optimizer_state']['state']) == num_params - 4

    pred = str(tmp_path / 'ensemble')
    _predict(ws, pred, TRAINER)
    # each stream exported in turn to the stock nnUNetTrainer folder and predicted there by stock nnU-Net
    plain = ws.model_folder('nnUNetTrainer')
    for stream in ('A', 'B'):
        ws.run('nnUNetv2_semiseg_export_plain', '-i', model, '-o', plain, '--stream', stream, '--overwrite')
        with open(os.path.join(plain, 'semiseg_export.json')) as f:
            assert json.load(f)['stream'] == stream
        with open(os.path.join(plain, 'plans.json')) as f:
            architecture = json.load(f)['configurations']['3d_fullres']['architecture']['network_class_name']
        assert architecture.endswith('PlainConvUNet' if stream == 'A' else 'ResidualEncoderUNet')
        exported = _load(os.path.join(plain, 'fold_0', 'checkpoint_final.pth'))
        assert exported['trainer_name'] == 'nnUNetTrainer' and exported['exported_stream'] == stream
        _predict(ws, str(tmp_path / f'pred_{stream}'), 'nnUNetTrainer')
    # The trained model predicts the mean of the two exported streams' probabilities. Per tile that is exact (see
    # test_streams_follow_the_plan_and_the_deployed_forward_is_the_ensemble); nnU-Net's sliding window then sums
    # Gaussian-weighted tile outputs in float16, which loses precision near tile borders, so here: close on average
    # (measured 0.001) and about 100x closer to the mean than to either stream (0.11).
    for case in ('test_000', 'test_001'):
        p_a, p_b = _probabilities(str(tmp_path / 'pred_A'), case), _probabilities(str(tmp_path / 'pred_B'), case)
        ensemble = _probabilities(pred, case)
        assert ensemble.shape == p_a.shape == p_b.shape
        to_mean = np.abs(ensemble - (p_a + p_b) / 2).mean()
        assert to_mean < 0.01
        assert to_mean < 0.1 * np.abs(ensemble - p_a).mean() and to_mean < 0.1 * np.abs(ensemble - p_b).mean()
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred, f'{case}.nii.gz')))
        assert seg.shape == ensemble.shape[1:]


def test_2d_trains_predicts_and_exports_stream_b(workspace, tmp_path):
    ws = workspace
    _train(ws, '2d', 1)
    model = ws.model_folder(TRAINER, '2d')
    final = _load(os.path.join(model, 'fold_0', 'checkpoint_final.pth'))
    assert final['init_args']['configuration'] == '2d' and np.isfinite(final['logging']['train_contrast'][0])
    _predict(ws, str(tmp_path / 'pred'), TRAINER, '2d')
    assert sorted(f for f in os.listdir(tmp_path / 'pred') if f.endswith('.nii.gz')) == ['test_000.nii.gz',
                                                                                        'test_001.nii.gz']
    ws.run('nnUNetv2_semiseg_export_plain', '-i', model, '-o', str(tmp_path / 'plain_B'), '--stream', 'B')
    assert os.path.isfile(tmp_path / 'plain_B' / 'fold_0' / 'checkpoint_final.pth')
