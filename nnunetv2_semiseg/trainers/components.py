"""The one shape every unsupervised idea takes, so that a trainer can compose ideas from different papers.

A *component* (:class:`LossComponent`) owns its hyperparameters, its state (teacher weights, memory banks, ...) and
its loss; it knows nothing of nnU-Net trainers. Every component of a step reads the same :class:`StepContext`: the
batch (labeled rows first, then unlabeled rows), the ONE student forward pass of that step, and the trainer's
output-layout helpers (softmax classes or sigmoid regions). A composed trainer
(:class:`nnunetv2_semiseg.trainers.composed.nnUNetTrainerComposed`) computes

    L = L_sup(labeled rows) + sum_k  w_k(t) * L_k(context)

with ``w_k(t) = component.weight_at(t)``, t the fraction of training done, and logs each ``L_k`` under
``component.name``.

Why one shared forward pass: the student's encoder/decoder run once per step on labeled + unlabeled rows (one call
through the DDP wrapper, see ``SemiSegNetwork.forward(train_fn=...)``); a component that needs extra passes (VAT,
perturbed decoder layers, a teacher) runs them itself on ``context.net``, inside the same call.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn


def heads_of(network: nn.Module, key: str) -> Optional[nn.Module]:
    """``network.heads`` itself when one component has heads, ``network.heads[key]`` when several do. Works for the
    student and for an EMA teacher (a copy of the student with the same heads layout)."""
    from nnunetv2_semiseg.networks.semiseg_network import ComponentHeads
    heads = getattr(network, 'heads', None)
    return heads[key] if isinstance(heads, ComponentHeads) else heads


@dataclass
class StepContext:
    """Everything the components of one training step share.

    ``out`` is ``SemiSegNetwork.forward_with_features(x)``: ``'seg'`` (deep-supervision list or one tensor),
    ``'features'`` (full-resolution last decoder features) and ``'skips'`` (encoder outputs), plus whatever a
    network wrapper adds. ``target`` holds the labeled rows' targets (a deep-supervision list or one tensor).
    ``cache`` lets components share derived values (e.g. hard labels) computed once per step. ``logged`` holds
    diagnostics a component reports with :meth:`log` (logged as terms, never added to the loss).
    """
    net: nn.Module
    x: torch.Tensor
    num_labeled: int
    target: Any
    out: Dict[str, Any]
    fraction: float
    to_probabilities: Callable[[torch.Tensor], torch.Tensor]
    to_hard_labels: Callable[[torch.Tensor], torch.Tensor]
    has_regions: bool = False
    step: int = 0
    cache: Dict[str, Any] = field(default_factory=dict)
    logged: Dict[str, torch.Tensor] = field(default_factory=dict)

    def log(self, name: str, value: torch.Tensor) -> None:
        """Report a diagnostic value of this step (e.g. a fallback count); the trainer logs it as term ``name``."""
        self.logged[name] = value.detach()

    def heads_for(self, key: str) -> Optional[nn.Module]:
        """The training heads of the component whose ``heads_key`` is ``key``: ``net.heads`` itself when a single
        component has heads, ``net.heads[key]`` when several do (see ``networks/semiseg_network.ComponentHeads``)."""
        return heads_of(self.net, key)

    @property
    def seg(self):
        return self.out['seg']

    @property
    def logits(self) -> torch.Tensor:
        """Full-resolution logits of all rows."""
        seg = self.out['seg']
        return seg[0] if isinstance(seg, (list, tuple)) else seg

    @property
    def labeled(self) -> slice:
        return slice(0, self.num_labeled)

    @property
    def unlabeled(self) -> slice:
        return slice(self.num_labeled, None)

    @property
    def full_resolution_target(self) -> torch.Tensor:
        return self.target[0] if isinstance(self.target, (list, tuple)) else self.target

    def probabilities(self) -> torch.Tensor:
        """float32 probabilities of all rows from the full-resolution logits (cached; carries the gradient)."""
        if 'probabilities' not in self.cache:
            self.cache['probabilities'] = self.to_probabilities(self.logits)
        return self.cache['probabilities']


class LossComponent:
    """Base of every unsupervised component.

    Subclasses set ``name`` (the logged term), usually ``weight`` and a ramp, and implement :meth:`loss`. State that
    must survive ``--c`` goes through :meth:`state_dict` / :meth:`load_state_dict`; the trainer stores it under
    ``checkpoint['semiseg'][component.state_key]`` (``state_key = None``: nothing to save). Trainable modules that
    share the student's forward pass (heads) are built by the trainer's ``build_component_heads`` under the
    component's ``heads_key`` and reached with ``context.heads_for(self.heads_key)``.
    """
    name: str = 'unsupervised'
    weight: float = 1.0
    state_key: Optional[str] = None
    # Key of this component's training heads in ``network.heads`` (see StepContext.heads_for); None = no heads.
    heads_key: Optional[str] = None
    # Which forward-pass outputs ``loss`` reads from ``context.out`` (see composed.OUTPUT_LAYOUTS): components of
    # one trainer must agree, because a step runs one forward pass.
    output_layout: str = 'one network'
    # Set (to the reason) by a component that cannot share a step with any other, e.g. one that replaces the
    # step's inputs and targets; the composed trainer then refuses it next to other components, with this reason.
    exclusive_reason: Optional[str] = None

    def ramp(self, fraction: float) -> float:
        """Ramp-up factor in [0, 1] at the given fraction of training (default: none)."""
        return 1.0

    def weight_at(self, fraction: float) -> float:
        return self.weight * self.ramp(fraction)

    def loss(self, context: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def after_optimizer_step(self, student: nn.Module, step: int) -> None:
        """Called after every optimizer step with the unwrapped student (EMA teachers, memory banks, the optimizer
        step of a component's own module such as a discriminator)."""

    def after_step_terms(self) -> Dict[str, torch.Tensor]:
        """Values computed in :meth:`after_optimizer_step` to log with this step's terms (e.g. a discriminator
        loss); the trainer adds them to the step's terms under their keys."""
        return {}

    def extra_modules(self) -> List[nn.Module]:
        """Modules outside the student's network that train with it (switched to train/eval with it)."""
        return []

    def to(self, device: torch.device) -> 'LossComponent':
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict], student: Optional[nn.Module] = None) -> None:
        """``state`` is None when the checkpoint has none (e.g. a plain nnU-Net checkpoint)."""
