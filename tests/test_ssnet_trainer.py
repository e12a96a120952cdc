"""nnUNetTrainerSSNet: the loss path on real nnU-Net networks (multi-class 2D, regions 3D, dropout), checkpoint
state, and end to end through the stock CLIs on the tiny synthetic dataset (CPU)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.trainers.ssnet import (nnUNetTrainerSSNet, nnUNetTrainerSSNet_KL, nnUNetTrainerSSNet_noCS,
                                             nnUNetTrainerSSNet_noLDS)


# ----------------------------------------------------------------------------------------------------------------
# The loss path without the nnU-Net data pipeline: a trainer object holding only what compute_loss_terms reads
# ----------------------------------------------------------------------------------------------------------------

def _unet(dim: int, num_outputs: int, dropout: bool = False) -> nn.Module:
    conv = nn.Conv2d if dim == 2 else nn.Conv3d
    norm = nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d
    drop = (nn.Dropout2d if dim == 2 else nn.Dropout3d) if dropout else None
    return PlainConvUNet(1, 3, (4, 8, 16), conv, 3, (1, 2, 2), (1, 1, 1), num_outputs, (1, 1), conv_bias=True,
                         norm_op=norm, norm_op_kwargs={'affine': True}, dropout_op=drop,
                         dropout_op_kwargs={'p': 0.2} if dropout else None, nonlin=nn.LeakyReLU,
                         deep_supervision=True)


def _sum_of_outputs_loss(seg_outputs, target):
    # Stand-in for nnU-Net's DC+CE: touches every deep-supervision output so every seg layer gets a gradient.
    return sum(s.float().pow(2).mean() for s in seg_outputs) * 0.01


def _loss_only_trainer(cls, label_manager: LabelManager, network: nn.Module):
    trainer = object.__new__(cls)
    trainer.label_manager = label_manager
    trainer.network = network
    trainer.device = torch.device('cpu')
    trainer.loss = _sum_of_outputs_loss
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 5, 1, 10
    trainer.build_components()
    return trainer


def _network(cls, dim, num_outputs, dropout=False):
    base = _unet(dim, num_outputs, dropout)
    return SemiSegNetwork(base, cls.build_training_heads(base, num_outputs))


def _run_step(trainer, data, target, unlabeled):
    encoder_calls = []
    handle = trainer.network.encoder.register_forward_pre_hook(lambda m, a: encoder_calls.append(a[0].shape[0]))
    try:
        terms = trainer.compute_loss_terms(data, target, {'data': unlabeled})
    finally:
        handle.remove()
    terms['loss'].backward()
    return terms, encoder_calls


def _ds_targets(full: torch.Tensor):
    return [full, full[..., ::2, ::2] if full.dim() == 4 else full[:, :, :, ::2, ::2]]


def test_multiclass_2d_step_all_parameters_get_gradients_and_memory_fills():
    torch.manual_seed(0)
    lm = LabelManager({'background': 0, 'RV': 1, 'Myo': 2, 'LV': 3}, None)     # ACDC layout, softmax
    trainer = _loss_only_trainer(nnUNetTrainerSSNet, lm, _network(nnUNetTrainerSSNet, 2, 4))
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        # ground truth = the network's own prediction, so every predicted foreground class has candidates
        gt = trainer.network(data)[0].argmax(1, keepdim=True)
    terms, encoder_calls = _run_step(trainer, data, _ds_targets(gt), unlabeled)
    assert set(terms) == {'loss', 'sup', 'lds', 'cs', 'lds_nonfinite'}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms['lds_nonfinite'].item() == 0
    assert terms['lds'].item() > 0 and terms['cs'].item() > 0
    # deterministic network: main + VAT probe + adversarial pass, all on labeled + unlabeled rows
    assert encoder_calls == [4, 4, 4]
    # total = sup + w(t) * (lds + 0.1 cs)
    w = trainer.unsupervised_weight_now()
    assert terms['loss'].item() == pytest.approx(terms['sup'].item() + w * (terms['lds'].item()
                                                                            + 0.1 * terms['cs'].item()), rel=1e-5)
    # every parameter of the network (heads included) has a gradient: DDP without find_unused_parameters works
    missing = [n for n, p in trainer.network.named_parameters() if p.grad is None]
    assert missing == []
    heads = trainer.network.heads
    assert heads.projector[0].weight.grad.abs().sum() > 0 and heads.predictor[0].weight.grad.abs().sum() > 0
    present = [c for c in (1, 2, 3) if int((gt == c).sum()) > 1]
    assert present, 'the random network should predict some foreground'
    for c in present:
        assert int(trainer.separation.memory.counts[c]) == min(32, int((gt == c).sum()))
        assert heads.memory_selectors[c][0].weight.grad.abs().sum() > 0
    assert int(trainer.separation.memory.counts[0]) == 0
    assert trainer.separation.memory.prototypes.grad is None


def test_regions_3d_with_ignore_channel_step():
    torch.manual_seed(1)
    lm = LabelManager({'background': 0, 'whole': [1, 2], 'core': [2], 'ignore': 3}, [1, 2])
    assert lm.has_regions and lm.has_ignore_label and lm.num_segmentation_heads == 2
    trainer = _loss_only_trainer(nnUNetTrainerSSNet, lm, _network(nnUNetTrainerSSNet, 3, 2))
    data, unlabeled = torch.randn(1, 1, 8, 16, 16), torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        regions = (torch.sigmoid(trainer.network(data)[0]) > 0.5).float()
    ignore = torch.zeros_like(regions[:, :1])
    ignore[..., :4, :] = 1                                                   # part of the patch is unlabeled
    target_full = torch.cat((regions, ignore), 1)
    terms, encoder_calls = _run_step(trainer, data, _ds_targets(target_full), unlabeled)
    assert all(torch.isfinite(v) for v in terms.values()) and terms['lds'].item() > 0
    assert encoder_calls == [2, 2, 2]
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []
    for r in range(2):
        expected = int((regions[:, r] * (1 - ignore[:, 0])).sum())
        assert int(trainer.separation.memory.counts[r]) == min(32, expected)


def test_dropout_network_gets_an_extra_target_pass():
    torch.manual_seed(2)
    lm = LabelManager({'background': 0, 'fg': 1}, None)
    trainer = _loss_only_trainer(nnUNetTrainerSSNet_noCS, lm, _network(nnUNetTrainerSSNet_noCS, 2, 2, True))
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(1, 1, 16, 16)
    gt = torch.randint(0, 2, (2, 1, 16, 16))
    terms, encoder_calls = _run_step(trainer, data, _ds_targets(gt), unlabeled)
    assert encoder_calls == [3, 3, 3, 3]          # main, no-grad VAT target, probe, adversarial
    assert set(terms) == {'loss', 'sup', 'lds', 'lds_nonfinite'}


def test_variants_switch_terms_and_heads():
    lm = LabelManager({'background': 0, 'fg': 1}, None)
    assert nnUNetTrainerSSNet_noCS.build_training_heads(_unet(2, 2), 2) is None
    assert isinstance(nnUNetTrainerSSNet.build_training_heads(_unet(2, 2), 2), SSNetHeads)
    kl = _loss_only_trainer(nnUNetTrainerSSNet_KL, lm, _network(nnUNetTrainerSSNet_KL, 2, 2))
    assert kl.smoothness.discrepancy_name == 'kl' and kl.separation is None
    torch.manual_seed(3)
    no_lds = _loss_only_trainer(nnUNetTrainerSSNet_noLDS, lm, _network(nnUNetTrainerSSNet_noLDS, 2, 2))
    gt = torch.randint(0, 2, (1, 1, 16, 16))
    terms, calls = _run_step(no_lds, torch.randn(1, 1, 16, 16), _ds_targets(gt), torch.randn(1, 1, 16, 16))
    assert set(terms) == {'loss', 'sup', 'cs'} and calls == [2]


# ----------------------------------------------------------------------------------------------------------------
# End to end through the stock CLIs (tiny synthetic dataset from conftest, CPU)
# ----------------------------------------------------------------------------------------------------------------

def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _train(ws, configuration, trainer, epochs, iterations, *extra):
    ws.run('nnUNetv2_train', str(ws.dataset_id), configuration, '0', '-tr', trainer, '-p', ws.plans,
           '-device', 'cpu', *extra, env=ws.train_env(epochs=epochs, iterations=iterations))


def _predict(ws, configuration, trainer, out):
    ws.run('nnUNetv2_predict', '-i', os.path.join(ws.raw, 'imagesTs'), '-o', out, '-d', str(ws.dataset_id),
           '-c', configuration, '-f', '0', '-tr', trainer, '-p', ws.plans, '-device', 'cpu', '-npp', '0', '-nps',
           '0', '--disable_tta')
    cases = sorted(f for f in os.listdir(out) if f.endswith('.nii.gz'))
    assert cases == ['test_000.nii.gz', 'test_001.nii.gz']
    return cases


def _check_run(checkpoint, num_epochs, terms=('sup', 'lds', 'cs')):
    for term in terms:
        values = checkpoint['logging'][f'train_{term}']
        assert len(values) == num_epochs and all(np.isfinite(values)), (term, values)


@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_ssnet_train_resume_predict_export(workspace, tmp_path, configuration):
    ws, trainer = workspace, 'nnUNetTrainerSSNet'
    _train(ws, configuration, trainer, 1, 2)
    fold = os.path.join(ws.model_folder(trainer, configuration), 'fold_0')
    final = _load(os.path.join(fold, 'checkpoint_final.pth'))
    _check_run(final, 1)
    assert final['logging']['train_lds'][0] > 0
    assert any(k.startswith('heads.feature_selectors.') for k in final['network_weights'])
    memory = final['semiseg']['ssnet_prototype_memory']
    assert memory['prototypes'].shape == (2, 32, 32) and memory['counts'].shape == (2,)
    assert int(memory['counts'][0]) == 0                        # background never has prototypes
    assert final['semiseg']['global_iteration'] == 2
    assert os.path.isfile(os.path.join(fold, 'progress_terms.png'))

    _train(ws, configuration, trainer, 2, 2, '--c')
    resumed = _load(os.path.join(fold, 'checkpoint_final.pth'))
    assert resumed['current_epoch'] == 2 and resumed['semiseg']['global_iteration'] == 4
    _check_run(resumed, 2)
    assert resumed['logging']['train_cs'][0] == pytest.approx(final['logging']['train_cs'][0])

    ours = str(tmp_path / 'ours')
    _predict(ws, configuration, trainer, ours)               # strict load, heads.* included

    # Plain export: stock nnUNetTrainer's network loads it strictly (the predictor's own loading code) and gives
    # the same logits as ours.
    plain_folder = ws.model_folder('nnUNetTrainer', configuration)
    ws.run('nnUNetv2_semiseg_export_plain', '-i', ws.model_folder(trainer, configuration), '-o', plain_folder)
    plain = _strictly_loaded_network(plain_folder)
    assert not any(k.startswith('heads.') for k in plain.state_dict())
    net = _strictly_loaded_network(ws.model_folder(trainer, configuration))
    assert any(k.startswith('heads.') for k in net.state_dict())
    x = torch.randn(1, 1, *net.patch_size)
    with torch.no_grad():
        assert torch.equal(plain(x), net(x))


def _strictly_loaded_network(model_folder):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, (0,), 'checkpoint_final.pth')  # strict
    network = predictor.network.eval()
    network.patch_size = tuple(predictor.configuration_manager.patch_size)
    return network


def test_ssnet_kl_variant_trains_and_predicts(workspace, tmp_path):
    ws, trainer = workspace, 'nnUNetTrainerSSNet_KL'
    _train(ws, '3d_fullres', trainer, 1, 2)
    final = _load(os.path.join(ws.model_folder(trainer), 'fold_0', 'checkpoint_final.pth'))
    _check_run(final, 1, terms=('sup', 'lds'))
    assert 'train_cs' not in final['logging']
    assert not any(k.startswith('heads.') for k in final['network_weights'])
    assert 'ssnet_prototype_memory' not in final['semiseg']
    _predict(ws, '3d_fullres', trainer, str(tmp_path / 'pred'))


def test_prototype_memory_survives_checkpoint_roundtrip(workspace, monkeypatch):
    ws = workspace
    ws.set_process_env(monkeypatch)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    plans = load_json(os.path.join(ws.preprocessed, ws.plans + '.json'))
    dataset_json = load_json(os.path.join(ws.preprocessed, 'dataset.json'))

    def make():
        p = dict(plans)
        p['continue_training'] = False
        t = nnUNetTrainerSSNet(p, '2d', 0, dataset_json, torch.device('cpu'))
        t.initialize()
        return t

    first = make()
    rows = torch.randn(5, 32)
    first.separation.memory.update(1, rows, torch.arange(5.0))
    path = os.path.join(first.output_folder, 'memory_roundtrip.pth')
    first.save_checkpoint(path)
    second = make()
    assert int(second.separation.memory.counts[1]) == 0
    second.load_checkpoint(path)
    assert int(second.separation.memory.counts[1]) == 5
    assert torch.equal(second.separation.memory.get(1), rows[[4, 3, 2, 1, 0]])
