"""``nnUNetTrainerComposed``: a semi-supervised trainer assembled from :mod:`~nnunetv2_semiseg.trainers.components`.

    L = L_sup(labeled rows) + sum_k w_k(t) * L_k(context)

A method lists its components in :meth:`build_loss_components`; the base runs ONE student forward pass per step
(inside one call through the possibly DDP-wrapped network), hands every component the same
:class:`~nnunetv2_semiseg.trainers.components.StepContext`, sums the weighted terms, logs each under its name, calls
every component after the optimizer step and saves/restores each component's state under
``checkpoint['semiseg'][component.state_key]``.
"""
from typing import Dict, List

import torch
from torch import nn

from nnunetv2_semiseg.networks.semiseg_network import combine_heads
from nnunetv2_semiseg.trainers.components import LossComponent, StepContext
from nnunetv2_semiseg.trainers.semi_supervised import nnUNetTrainerSemiSupervised


class ComponentConflictError(ValueError):
    pass


# What ``context.out`` holds for each ``LossComponent.output_layout`` (used in the refusal message).
OUTPUT_LAYOUTS = {
    'one network': "one network's outputs (out['seg'], 'features', 'skips', 'penultimate' of "
                   "SemiSegNetwork.forward_with_features)",
    'two streams': "two streams' outputs (out['A'] and out['B'] of DualStreamNetwork.forward_streams)",
}


def check_components_compose(components: List[LossComponent], trainer_name: str) -> None:
    """Refuse components that cannot share one training step, with the reason:

    * a component that declares it cannot share a step (``exclusive_reason``, e.g. one that replaces the batch
      every other component would read), when it is listed with any other;
    * components that read different forward-pass layouts (``output_layout``: one network vs two streams);
    * two components with the same logged ``name`` (one term would hide the other), ``state_key`` (one
      checkpoint slot for two states) or ``heads_key`` (one set of heads for two components).
    """
    if len(components) > 1:
        for component in components:
            reason = getattr(component, 'exclusive_reason', None)
            if reason:
                others = ', '.join(type(c).__name__ for c in components if c is not component)
                raise ComponentConflictError(
                    f'{trainer_name}: {type(component).__name__} cannot share a training step with other '
                    f'components ({others}): {reason}')
        first = components[0]
        for component in components[1:]:
            if component.output_layout != first.output_layout:
                raise ComponentConflictError(
                    f'{trainer_name}: {type(first).__name__} reads '
                    f'{OUTPUT_LAYOUTS.get(first.output_layout, first.output_layout)}, but '
                    f'{type(component).__name__} reads '
                    f'{OUTPUT_LAYOUTS.get(component.output_layout, component.output_layout)}; one step\'s forward '
                    f'pass gives one of them, so these components cannot share a trainer.')
    for attribute in ('name', 'state_key', 'heads_key'):
        seen: Dict[str, LossComponent] = {}
        for component in components:
            value = getattr(component, attribute)
            if value is None:
                continue
            if value in seen:
                raise ComponentConflictError(
                    f'{trainer_name}: components {type(seen[value]).__name__} and {type(component).__name__} have '
                    f'the same {attribute} {value!r}; give one of them another {attribute} (a class attribute or an '
                    f'instance attribute set in build_loss_components).')
            seen[value] = component


class nnUNetTrainerComposed(nnUNetTrainerSemiSupervised):
    """Subclasses implement :meth:`build_loss_components` and set ``loss_term_names = ('sup', <names>...)``."""

    def initialize(self):
        super().initialize()
        self.loss_components = self.build_loss_components()
        check_components_compose(self.loss_components, type(self).__name__)
        for component in self.loss_components:
            component.to(self.device)
        self._last_terms: Dict[str, torch.Tensor] = {}

    def build_loss_components(self) -> List[LossComponent]:
        raise NotImplementedError

    @classmethod
    def build_component_heads(cls, base_network: nn.Module, num_output_channels: int) -> Dict[str, nn.Module]:
        """Training heads per component ``heads_key`` (class-level: the predictor rebuilds them from the class).
        Combining trainers merge their parents' dicts."""
        return {}

    @classmethod
    def build_training_heads(cls, base_network: nn.Module, num_output_channels: int):
        # One component with heads: its module is ``network.heads``; several: a ComponentHeads dict by key.
        return combine_heads(cls.build_component_heads(base_network, num_output_channels))

    # ------------------------------------------------------------------------------------------------------------
    def student_forward(self, net: nn.Module, x: torch.Tensor) -> dict:
        """The step's one student pass (override to expose more intermediate outputs)."""
        return net.forward_with_features(x)

    def make_context(self, net: nn.Module, x: torch.Tensor, target, num_labeled: int) -> StepContext:
        return StepContext(net=net, x=x, num_labeled=num_labeled, target=target, out=self.student_forward(net, x),
                           fraction=self.training_fraction(), to_probabilities=self.rows_to_probabilities,
                           to_hard_labels=self.rows_to_hard_labels, has_regions=self.label_manager.has_regions,
                           step=self.global_iteration)

    def compute_loss_terms(self, data, target, unlabeled) -> Dict[str, torch.Tensor]:
        num_labeled = data.shape[0]
        x = torch.cat((data, unlabeled['data']))
        return self.network(x, train_fn=lambda net, inp: self.composed_loss(net, inp, target, num_labeled))

    def composed_loss(self, net: nn.Module, x: torch.Tensor, target, num_labeled: int) -> Dict[str, torch.Tensor]:
        context = self.make_context(net, x, target, num_labeled)
        terms = {'sup': self.supervised_loss(self.labeled_rows(context.seg, num_labeled), target)}
        total = terms['sup']
        for component in self.loss_components:
            terms[component.name] = component.loss(context)
            total = total + component.weight_at(context.fraction) * terms[component.name]
        terms.update(context.logged)
        terms['loss'] = total
        # train_step reads the same dict after the optimizer step: after_optimizer_step adds the components'
        # after-step values (e.g. a discriminator's loss) to it.
        self._last_terms = terms
        return terms

    def after_optimizer_step(self) -> None:
        for component in self.loss_components:
            component.after_optimizer_step(self.unwrapped_network, self.global_iteration)
            self._last_terms.update(component.after_step_terms())

    def extra_modules_for_mode_switch(self) -> List[nn.Module]:
        return [m for c in self.loss_components for m in c.extra_modules()]

    # ------------------------------------------------------------------------------------------------------------
    def semiseg_state(self) -> dict:
        state = super().semiseg_state()
        for component in self.loss_components:
            if component.state_key is not None:
                state[component.state_key] = component.state_dict()
        return state

    def load_semiseg_state(self, state) -> None:
        super().load_semiseg_state(state)
        for component in self.loss_components:
            if component.state_key is not None:
                saved = state.get(component.state_key) if state is not None else None
                component.load_state_dict(saved, student=self.unwrapped_network)
