"""Every pair of the package's loss components, composed into a throwaway trainer on the tiny 2d plans.

The component classes are found by walking ``LossComponent``'s subclasses after importing every trainer module, so a
new component is covered (or fails ``test_every_component_can_be_built``) without editing this file's pair list.
For each pair (a class with itself included), the expected outcome is derived here from the classes' declared
attributes:

* refused when the trainer is built (``ComponentConflictError``, message checked) if one of the two declares an
  ``exclusive_reason``, if they read different ``output_layout``\\ s (one network vs two streams), or if they share
  a ``name``, ``state_key`` or ``heads_key``;
* otherwise the pair composes: on one batch, each component's term equals the term of the same component computed
  alone (same network weights, same component state, same random seeds), the total is L_sup + the weighted alone
  terms, one ``train_step`` runs, and a checkpoint saved after it restores, in a freshly built trainer, the network
  and every component's state so exactly that the next step's terms are the same.

"Alone" is the same trainer with only that component in ``loss_components``; before each computation the network
(buffers included: the SS-Net heads' BatchNorm statistics change with every training forward) and every
component's state are restored to one snapshot. Seeds: each component's ``loss`` is wrapped to re-seed torch's
generator with a value of its own class first, so its random draws (VAT directions, FLPM epsilons, voxel samples,
teacher noise) do not depend on which other component ran before it in the step. Components that need another
component's teacher (voxel-adversarial alignment, BYOL voxel features) share one hidden EMA teacher per trainer, as
``nnUNetTrainerVoxelAdversarial`` does; it is not listed as a component, so it is neither updated nor saved (both
trainers of a checkpoint round trip start from the same seed), and it has no input noise (see ``_voxel_teacher``).
"""
import copy
import importlib
import itertools
import os
import pkgutil
import re
import zlib

import pytest
import torch

import nnunetv2_semiseg.trainers as trainers_package
from nnunetv2_semiseg.losses.copy_paste import downsample_like_targets
from nnunetv2_semiseg.networks.reconstruction_decoder import ReconstructionDecoder
from nnunetv2_semiseg.networks.ssnet_heads import SSNetHeads
from nnunetv2_semiseg.networks.voxel_discriminator import VoxelDiscriminator, VoxelFeatureHeads
from nnunetv2_semiseg.trainers.bcp_components import BCPTeacher
from nnunetv2_semiseg.trainers.components import LossComponent
from nnunetv2_semiseg.trainers.composed import ComponentConflictError, nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.dualstream import nnUNetTrainerDualStream
from nnunetv2_semiseg.trainers.dualstream_components import (CosineConsistency, EntropyFilteredPseudoLabels,
                                                             PrototypeContrast, UncertaintyWeightedPseudoLabels)
from nnunetv2_semiseg.trainers.flpm_components import Reconstruction
from nnunetv2_semiseg.trainers.mean_teacher_component import MeanTeacherConsistency
from nnunetv2_semiseg.trainers.ssnet_components import PrototypeSeparation
from nnunetv2_semiseg.trainers.voxel_adversarial import encoder_levels
from nnunetv2_semiseg.trainers.voxel_adversarial_components import (VoxelAdversarialAlignment, VoxelFeatureBYOL,
                                                                    VoxelRouting, num_routing_heads)

CONFIGURATION = '2d'
PATCH = (16, 16)            # any multiple of 4 fits the tiny 2d network; smaller than the plans' 32x32 = faster
FEATURE_DIM = 8             # voxel-adversarial / BYOL feature width (paper: 64), small for speed
STEPS = 4                   # schedule length: global_iteration 2 of 4 = t 0.5, every ramp is well above 0


def _component_classes():
    for module in pkgutil.iter_modules(trainers_package.__path__):
        importlib.import_module(f'{trainers_package.__name__}.{module.name}')
    found, stack = set(), [LossComponent]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            # concrete components of the package (a shared base without its own loss, e.g. RampedComponent, is not)
            if sub.__module__.startswith('nnunetv2_semiseg.') and sub.loss is not LossComponent.loss:
                found.add(sub)
    return sorted(found, key=lambda c: c.__name__)


COMPONENTS = _component_classes()


# ----------------------------------------------------------------------------------------------------------------
# how to build each component (and its heads) for a trainer; a class not listed is built as cls()
# ----------------------------------------------------------------------------------------------------------------
def _num_outputs(trainer):
    return trainer.label_manager.num_segmentation_heads


def _voxel_teacher(trainer):
    if not hasattr(trainer, '_pair_voxel_teacher'):
        # No input noise: its one pass per step is shared by design (cached in the step context), so with noise
        # a component's term would depend on which component's seed drew the noise.
        trainer._pair_voxel_teacher = MeanTeacherConsistency(trainer.unwrapped_network, weight=0.001, rows='all',
                                                             teacher_features=True, noise_std=0.0)
    return trainer._pair_voxel_teacher


def _routing(trainer):
    return VoxelRouting(_num_outputs(trainer), trainer.label_manager.has_regions,
                        trainer.label_manager.has_ignore_label, threshold=0.7, voxels_per_class=64)


def _levels(trainer):
    return encoder_levels(trainer.unwrapped_network.encoder, 4)


BUILDERS = {
    MeanTeacherConsistency: lambda t: MeanTeacherConsistency(t.unwrapped_network),
    BCPTeacher: lambda t: BCPTeacher(t.unwrapped_network),
    PrototypeSeparation: lambda t: PrototypeSeparation(_num_outputs(t), max_voxels_per_class=256),
    VoxelAdversarialAlignment: lambda t: VoxelAdversarialAlignment(
        VoxelDiscriminator(_levels(t), num_routing_heads(_num_outputs(t), False), FEATURE_DIM), _voxel_teacher(t),
        _routing(t), len(_levels(t))),
    VoxelFeatureBYOL: lambda t: VoxelFeatureBYOL(_voxel_teacher(t), _routing(t), len(_levels(t))),
    EntropyFilteredPseudoLabels: lambda t: EntropyFilteredPseudoLabels(0.1, 1.0),
    UncertaintyWeightedPseudoLabels: lambda t: UncertaintyWeightedPseudoLabels(0.1, 1.0),
    CosineConsistency: lambda t: CosineConsistency(0.1, 1.0),
    PrototypeContrast: lambda t: PrototypeContrast(0.1, 1.0, _num_outputs(t)),
}

HEADS = {   # heads_key -> heads module for the base network (class-level, as the predictor rebuilds them)
    Reconstruction.heads_key: lambda base, n: ReconstructionDecoder(base, 1),
    PrototypeSeparation.heads_key: lambda base, n: SSNetHeads(base.encoder.output_channels[0], n),
    VoxelFeatureBYOL.heads_key: lambda base, n: VoxelFeatureHeads(encoder_levels(base.encoder, 4), FEATURE_DIM),
}


def _build(cls, trainer):
    return BUILDERS[cls](trainer) if cls in BUILDERS else cls()


def _trainer_class(classes):
    """A throwaway composed trainer for these component classes (the dual-stream trainer for two-stream ones)."""
    # A mixed pair (refused) gets the one-network trainer: one-network components may need its network to be built
    two_streams = all(c.output_layout == 'two streams' for c in classes)
    base = nnUNetTrainerDualStream if two_streams else nnUNetTrainerComposed

    def build_component_heads(cls, base_network, num_output_channels):
        return {c.heads_key: HEADS[c.heads_key](base_network, num_output_channels) for c in classes if c.heads_key}

    def build_loss_components(self):
        return [_build(c, self) for c in classes]

    return type('nnUNetTrainerPair_' + '_'.join(c.__name__ for c in classes), (base,), {
        'build_component_heads': classmethod(build_component_heads),
        'build_loss_components': build_loss_components,
        'loss_term_names': ('sup',) + tuple(dict.fromkeys(c.name for c in classes)),
        'allow_torch_compile': False,
    })


# ----------------------------------------------------------------------------------------------------------------
# fixtures: one copy of the tiny dataset for the module, env per test
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pair_workspace(tiny_dataset, tmp_path_factory):
    return tiny_dataset.copy_to(str(tmp_path_factory.mktemp('pairs')))


@pytest.fixture
def make_trainer(pair_workspace, monkeypatch):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    ws = pair_workspace
    ws.set_process_env(monkeypatch)
    plans = load_json(os.path.join(ws.preprocessed, ws.plans + '.json'))
    dataset_json = load_json(os.path.join(ws.preprocessed, 'dataset.json'))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(cls, initialize=True):
        torch.manual_seed(0)               # the same initial network (and hidden teacher) for every build
        trainer = cls({**plans, 'continue_training': False}, CONFIGURATION, 0, dataset_json, torch.device('cpu'))
        trainer.num_epochs, trainer.num_iterations_per_epoch = 1, STEPS
        trainer.print_to_log_file = lambda *args, **kwargs: None
        if initialize:
            trainer.initialize()
            trainer.global_iteration = STEPS // 2
            for component in trainer.loss_components:
                _seed_each_loss_call(component)
        return trainer

    yield make
    torch.set_num_threads(previous_threads)


def _seed_each_loss_call(component):
    loss, seed = component.loss, zlib.crc32(type(component).__name__.encode())

    def seeded(context):
        torch.manual_seed(seed)
        return loss(context)
    component.loss = seeded


def _batch(trainer, seed=3):
    g = torch.Generator().manual_seed(seed)
    n = trainer.batch_size
    x, u = torch.randn(n, 1, *PATCH, generator=g), torch.randn(n, 1, *PATCH, generator=g)
    y = torch.randint(0, _num_outputs(trainer), (n, 1, *PATCH), generator=g).to(torch.int16)
    return x, downsample_like_targets(y, trainer._get_deep_supervision_scales()), u


# ----------------------------------------------------------------------------------------------------------------
# expected outcome, from the classes' declared attributes
# ----------------------------------------------------------------------------------------------------------------
def _expected_refusal(a, b):
    """A regex the refusal message must match, or None when the pair must compose."""
    for c in (a, b):
        if c.exclusive_reason:
            return re.escape(f'{c.__name__} cannot share a training step with other components') + '.*' + \
                re.escape(c.exclusive_reason)
    if a.output_layout != b.output_layout:
        return f'{a.__name__} reads .*{a.output_layout.split()[-1]}.*{b.__name__} reads .*' \
               f'{b.output_layout.split()[-1]}.*cannot share a trainer'
    for attribute in ('name', 'state_key', 'heads_key'):
        value = getattr(a, attribute)
        if value is not None and value == getattr(b, attribute):
            return re.escape(f'the same {attribute} {value!r}')
    return None


# every unordered pair, a class with itself included (two instances: refused for their common name at least)
PAIRS = list(itertools.combinations_with_replacement(COMPONENTS, 2))
REFUSED = [p for p in PAIRS if _expected_refusal(*p) is not None]
COMPOSING = [p for p in PAIRS if _expected_refusal(*p) is None]


def _ids(pairs):
    return ['+'.join(c.__name__ for c in p) for p in pairs]


def test_the_pair_list_covers_every_component_and_both_outcomes():
    names = {c.__name__ for c in COMPONENTS}
    # the components of every method trainer of the package (a missing one means discovery is broken)
    assert {'MeanTeacherConsistency', 'BidirectionalCopyPaste', 'BCPTeacher', 'FeaturePerturbedConsistency',
            'Reconstruction', 'DiceVATSmoothness', 'PrototypeSeparation', 'VoxelAdversarialAlignment',
            'VoxelFeatureBYOL', 'EntropyFilteredPseudoLabels', 'UncertaintyWeightedPseudoLabels',
            'CosineConsistency', 'PrototypeContrast', 'CrossReliableMistake'} <= names
    assert 'RampedComponent' not in names
    assert len(PAIRS) == len(COMPONENTS) * (len(COMPONENTS) + 1) // 2
    assert not [p for p in COMPOSING if p[0] is p[1]]
    # BCP's copy-paste rewrites the batch: it composes with nothing
    assert not [p for p in COMPOSING if any(c.__name__ == 'BidirectionalCopyPaste' for c in p)]
    assert COMPOSING and REFUSED


def test_every_component_can_be_built(make_trainer):
    """A new component needs a builder here if its constructor takes arguments, and a heads entry if it has heads."""
    one = make_trainer(_trainer_class((MeanTeacherConsistency,)))
    two = make_trainer(_trainer_class((CosineConsistency,)))
    for cls in COMPONENTS:
        trainer = two if cls.output_layout == 'two streams' else one
        assert isinstance(_build(cls, trainer), cls)
        if cls.heads_key is not None:
            assert cls.heads_key in HEADS, f'{cls.__name__} has heads {cls.heads_key!r}: add them to HEADS'


@pytest.mark.parametrize('pair', REFUSED, ids=_ids(REFUSED))
def test_pair_is_refused_with_its_reason(pair, make_trainer):
    trainer = make_trainer(_trainer_class(pair), initialize=False)
    with pytest.raises(ComponentConflictError, match=_expected_refusal(*pair)) as refusal:
        trainer.initialize()
    assert type(trainer).__name__ in str(refusal.value)


def _restore(trainer, network_state, components, states):
    # the network's buffers too: e.g. the SS-Net heads' BatchNorm running statistics, updated by every training
    # forward and read by the prototype refresh (eval mode)
    trainer.unwrapped_network.load_state_dict(copy.deepcopy(network_state))
    for component, state in zip(components, states):
        if state is not None:
            component.load_state_dict(copy.deepcopy(state))


def _assert_same_state(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


@pytest.mark.parametrize('pair', COMPOSING, ids=_ids(COMPOSING))
def test_pair_terms_equal_each_component_alone_and_survive_a_checkpoint(pair, make_trainer):
    cls = _trainer_class(pair)
    trainer = make_trainer(cls)
    components = list(trainer.loss_components)
    network_state = copy.deepcopy(trainer.unwrapped_network.state_dict())
    states = [copy.deepcopy(c.state_dict()) if c.state_key is not None else None for c in components]
    x, target, u = _batch(trainer)

    together = trainer.compute_loss_terms(x, target, {'data': u})
    alone = {}
    for component in components:
        # the same starting state as the pair's computation (e.g. the prototype memory is refreshed inside loss())
        _restore(trainer, network_state, components, states)
        trainer.loss_components = [component]
        alone[component.name] = trainer.compute_loss_terms(x, target, {'data': u})
    trainer.loss_components = components
    fraction = trainer.training_fraction()
    expected_total = together['sup'].item()
    for component in components:
        value = alone[component.name][component.name].item()
        assert torch.isfinite(together[component.name])
        assert together[component.name].item() == pytest.approx(value, rel=1e-6, abs=1e-8), component.name
        assert alone[component.name]['sup'].item() == pytest.approx(together['sup'].item(), rel=1e-6)
        expected_total += component.weight_at(fraction) * value
    assert together['loss'].item() == pytest.approx(expected_total, rel=1e-6, abs=1e-8)

    # one training step of the pair, then a checkpoint that a freshly built trainer restores exactly
    _restore(trainer, network_state, components, states)
    trainer.next_unlabeled_batch = lambda: {'data': u}
    logged = trainer.train_step({'data': x, 'target': target})
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logged.values())
    assert trainer.global_iteration == STEPS // 2 + 1
    os.makedirs(trainer.output_folder, exist_ok=True)
    path = os.path.join(trainer.output_folder, 'pair.pth')
    trainer.save_checkpoint(path)
    restored = make_trainer(cls)
    restored.load_checkpoint(path)
    assert restored.global_iteration == trainer.global_iteration             # checkpoint['semiseg'] step counter
    _assert_same_state(trainer.unwrapped_network.state_dict(), restored.unwrapped_network.state_dict(), 'network')
    for mine, theirs in zip(components, restored.loss_components):
        if mine.state_key is not None:
            _assert_same_state(mine.state_dict(), theirs.state_dict(), mine.state_key)
    x2, target2, u2 = _batch(trainer, seed=4)
    after, resumed = (t.compute_loss_terms(x2, target2, {'data': u2}) for t in (trainer, restored))
    for name in cls.loss_term_names:
        assert resumed[name].item() == pytest.approx(after[name].item(), rel=1e-6, abs=1e-8), name
