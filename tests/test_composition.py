"""Composition across papers: the composed loss is the weighted sum of the components' losses computed separately on
the same batch, heads of several components coexist under ``network.heads``, and ``nnUNetTrainerSSNetFLPM`` (a
subclass of a few lines) trains, resumes and predicts through the stock CLIs."""
import inspect

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from torch import nn

from nnunetv2_semiseg.networks.reconstruction_decoder import ReconstructionDecoder
from nnunetv2_semiseg.networks.semiseg_network import ComponentHeads, SemiSegNetwork
from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.trainers import flpm_ssnet
from nnunetv2_semiseg.trainers.components import StepContext
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.flpm import nnUNetTrainerFLPM
from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency, Reconstruction
from nnunetv2_semiseg.trainers.flpm_ssnet import nnUNetTrainerSSNetFLPM
from nnunetv2_semiseg.trainers.ramps import sigmoid_rampup
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet
from nnunetv2_semiseg.trainers.ssnet_components import DiceVATSmoothness, PrototypeSeparation

LABELS = {'background': 0, 'RV': 1, 'Myo': 2, 'LV': 3}


def _unet():
    return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), (2, 2, 2), 4, (2, 2), conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
                         deep_supervision=True)


def _supervised(seg_outputs, target):
    return sum(s.float().pow(2).mean() for s in seg_outputs) * 0.01


def _trainer(cls):
    base = _unet()
    trainer = object.__new__(cls)
    trainer.label_manager = LabelManager(LABELS, None)
    trainer.network = SemiSegNetwork(base, cls.build_training_heads(base, 4))
    trainer.device = torch.device('cpu')
    trainer.loss = _supervised
    trainer.global_iteration, trainer.num_epochs, trainer.num_iterations_per_epoch = 3, 1, 10
    trainer.loss_components = trainer.build_loss_components()
    return trainer


def _context(trainer, x, target, num_labeled):
    net = trainer.network
    return StepContext(net=net, x=x, num_labeled=num_labeled, target=target, out=net.forward_with_features(x),
                       fraction=trainer.training_fraction(), to_probabilities=trainer.rows_to_probabilities,
                       to_hard_labels=trainer.rows_to_hard_labels)


def test_ssnet_flpm_is_a_short_subclass_of_the_composed_trainer():
    source = inspect.getsource(nnUNetTrainerSSNetFLPM)
    assert len(source.strip().splitlines()) <= 15
    assert nnUNetTrainerSSNetFLPM.__bases__ == (nnUNetTrainerComposed,)
    assert 'nnUNetTrainerSSNetFLPM' in inspect.getsource(flpm_ssnet)


def test_composed_loss_equals_the_weighted_sum_of_separately_computed_component_losses():
    torch.manual_seed(0)
    trainer = _trainer(nnUNetTrainerSSNetFLPM)
    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    x = torch.cat((data, unlabeled))
    torch.manual_seed(11)                       # the VAT direction and the FLPM epsilons come from this state
    terms = trainer.compute_loss_terms(data, None, {'data': unlabeled})
    assert set(terms) == {'loss', 'sup', 'lds', 'fpc', 'lds_nonfinite'}

    # separately: fresh components, one context each, the same random draws in the same order
    torch.manual_seed(11)
    context = _context(trainer, x, None, 2)
    lds = DiceVATSmoothness().loss(_context(trainer, x, None, 2))
    fpc = FeaturePerturbedConsistency().loss(context)
    sup = _supervised([s[:2] for s in context.seg], None)
    fraction = 0.3
    expected = sup + sigmoid_rampup(fraction, 0.4) * lds + 0.1 * sigmoid_rampup(fraction, 1.0) * fpc
    assert terms['lds'].item() == pytest.approx(lds.item(), rel=1e-5)
    assert terms['fpc'].item() == pytest.approx(fpc.item(), rel=1e-5)
    assert terms['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms['lds'].item() > 0 and terms['fpc'].item() > 0


class _SeparationAndReconstruction(nnUNetTrainerComposed):
    """Two components with heads: SS-Net's prototype separation and SFPC's reconstruction decoder."""
    loss_term_names = ('sup', 'cs', 'rec')

    @classmethod
    def build_component_heads(cls, base_network, num_output_channels):
        return {**nnUNetTrainerSSNet.build_component_heads(base_network, num_output_channels),
                **nnUNetTrainerFLPM.build_component_heads(base_network, num_output_channels)}

    def build_loss_components(self):
        return [PrototypeSeparation(4), Reconstruction()]


def test_heads_of_several_components_coexist_and_single_component_keys_are_unchanged():
    ssnet_heads = nnUNetTrainerSSNet.build_training_heads(_unet(), 4)
    assert isinstance(ssnet_heads, SSNetHeads)                          # one component: heads.projector.* as before
    assert nnUNetTrainerSSNetFLPM.build_training_heads(_unet(), 4) is None

    torch.manual_seed(1)
    trainer = _trainer(_SeparationAndReconstruction)
    heads = trainer.network.heads
    assert isinstance(heads, ComponentHeads) and set(heads) == {'separation', 'reconstruction'}
    assert isinstance(heads['separation'], SSNetHeads) and isinstance(heads['reconstruction'], ReconstructionDecoder)
    keys = trainer.network.state_dict()
    assert any(k.startswith('heads.separation.projector.') for k in keys)
    assert any(k.startswith('heads.reconstruction.decoder.') for k in keys)

    data, unlabeled = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        gt = trainer.network(data)[0].argmax(1, keepdim=True)
    terms = trainer.compute_loss_terms(data, [gt, gt[..., ::2, ::2]], {'data': unlabeled})
    assert terms['cs'].item() > 0 and terms['rec'].item() > 0
    terms['loss'].backward()
    assert [n for n, p in trainer.network.named_parameters() if p.grad is None] == []
    assert heads['separation'].projector[0].weight.grad.abs().sum() > 0
    assert heads['reconstruction'].decoder.seg_layers[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# End to end through the stock CLIs
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_ssnet_flpm_train_resume_predict_export(workspace, tmp_path, configuration):
    from test_flpm import run_train_resume_predict_export
    final = run_train_resume_predict_export(workspace, tmp_path, configuration, 'nnUNetTrainerSSNetFLPM',
                                            ('sup', 'lds', 'fpc', 'lds_nonfinite'))
    assert final['logging']['train_lds'][0] > 0 and final['logging']['train_fpc'][0] > 0
    assert final['logging']['train_lds_nonfinite'] == [0.0, 0.0]
    assert not any(k.startswith('heads.') for k in final['network_weights'])


@pytest.mark.parametrize('attribute', ['name', 'state_key', 'heads_key'])
def test_components_with_the_same_name_state_key_or_heads_key_are_refused(attribute):
    from nnunetv2_semiseg.trainers.components import LossComponent
    from nnunetv2_semiseg.trainers.composed import ComponentConflictError, check_components_compose
    a, b = LossComponent(), LossComponent()
    a.name, b.name = 'a', 'b'
    setattr(a, attribute, 'same')
    setattr(b, attribute, 'same')
    with pytest.raises(ComponentConflictError, match=f"same {attribute} 'same'"):
        check_components_compose([a, b], 'nnUNetTrainerX')
    setattr(b, attribute, 'other')
    check_components_compose([a, b], 'nnUNetTrainerX')
