"""nnU-Net's local logger with a progress.png that compares like with like.

nnU-Net's ``progress.png`` plots ``train_losses`` against ``val_losses``; a widening gap between them is the usual
sign of over-fitting. For a semi-supervised trainer ``train_losses`` is the *total* loss, the supervised DC+CE plus
the weighted unsupervised terms, so the gap also measures those terms (BCP's total is two mixed-patch losses, about
twice a supervised one). :class:`SemiSupervisedLocalLogger` therefore draws the supervised part of the training
loss against the validation loss, and the total with every term in ``progress_terms.png``.

What "supervised part" means for each trainer (:func:`supervised_curve_for`):

* a ``sup`` term (every trainer but BCP): that term, times the trainer's ``progress_supervised_curve`` weight where it
  declares one (the dual-stream trainer's ``sup`` sums two streams and is halved);
* BCP (``pretrain``, ``inward``, ``outward``): there is no separate supervised term; every loss is on copy-paste
  mixed patches. The curve is ``pretrain + mean(inward, outward)``, the loss of one batch of mixed patches: during
  pre-training its targets are all ground truth, afterwards part ground truth, part teacher pseudo-labels. Its scale
  is that of nnU-Net's DC+CE, but it is not a pure ground-truth loss, and the label says so;
* anything else: the total, labelled as the total.

The logged values themselves (the dict nnU-Net checkpoints and restores on ``--c``) are unchanged, and the
``MetaLogger`` around this logger still sends every logged value to Weights & Biases when enabled.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_semiseg.utilities.plotting import plot_loss_terms, plot_progress


@dataclass(frozen=True)
class SupervisedCurve:
    """The training curve of progress.png: ``sum_k weights[k] * train_<k>`` per epoch, drawn with ``label``."""
    weights: Mapping[str, float] = field(default_factory=dict)
    label: str = ''


TOTAL_LABEL = 'loss_tr (total: this trainer logs no supervised term)'


def supervised_curve_for(loss_term_names: Sequence[str],
                         declared: Optional[SupervisedCurve] = None) -> Optional[SupervisedCurve]:
    """The curve for a trainer with these logged terms; ``declared`` (the trainer's ``progress_supervised_curve``)
    wins. None: no supervised term, plot the total."""
    names = tuple(loss_term_names)
    if declared is not None:
        unknown = [t for t in declared.weights if t not in names]
        if unknown or not declared.weights:
            raise ValueError(f'progress_supervised_curve uses the term(s) {unknown or "(none)"}, but the trainer logs '
                             f'{list(names)} (loss_term_names).')
        return declared
    if 'sup' in names:
        return SupervisedCurve({'sup': 1.0}, 'loss_tr (supervised part: sup)')
    if 'pretrain' in names and 'inward' in names:
        mixed = [t for t in ('inward', 'outward') if t in names]
        return SupervisedCurve({'pretrain': 1.0, **{t: 1.0 / len(mixed) for t in mixed}},
                               'loss_tr (BCP: pretrain + '
                               f'{"mean(inward, outward)" if len(mixed) == 2 else "inward"}, mixed patches; '
                               'part pseudo-labels after pre-training)')
    return None


def training_curve(logging: Dict[str, List], curve: Optional[SupervisedCurve]) -> Tuple[List[float], str]:
    """(one value per logged epoch, label) of the training curve that progress.png draws."""
    if curve is None:
        return [float(v) for v in logging['train_losses']], TOTAL_LABEL
    columns = [logging[f'train_{t}'] for t in curve.weights]
    num_epochs = min(len(c) for c in columns)
    values = [sum(w * float(c[e]) for w, c in zip(curve.weights.values(), columns)) for e in range(num_epochs)]
    return values, curve.label


class SemiSupervisedLocalLogger(LocalLogger):
    """``LocalLogger`` whose ``plot_progress_png`` writes progress.png (supervised part vs validation loss) and
    progress_terms.png (total and every term)."""

    def __init__(self, loss_term_names: Sequence[str], supervised_curve: Optional[SupervisedCurve] = None,
                 verbose: bool = False):
        super().__init__(verbose)
        self.loss_term_names = tuple(loss_term_names)
        self.supervised_curve = supervised_curve_for(self.loss_term_names, supervised_curve)

    @classmethod
    def replacing(cls, logger: LocalLogger, loss_term_names: Sequence[str],
                  supervised_curve: Optional[SupervisedCurve] = None) -> 'SemiSupervisedLocalLogger':
        """Takes over ``logger``'s values (the same dict, so keys registered on either stay visible)."""
        new = cls(loss_term_names, supervised_curve, logger.verbose)
        new.my_fantastic_logging = logger.my_fantastic_logging
        return new

    def term_key(self, term: str) -> str:
        return f'train_{term}'

    def plot_progress_png(self, output_folder: str) -> None:
        logging = self.my_fantastic_logging
        # As nnU-Net: the epochs for which every list has its value (a list logged less often would hold it back).
        num_epochs = min(len(v) for v in logging.values())
        train_loss, label = training_curve(logging, self.supervised_curve)
        plot_progress(train_loss, label, logging, num_epochs, os.path.join(output_folder, 'progress.png'))
        terms = {t: logging[self.term_key(t)][:num_epochs] for t in self.loss_term_names
                 if self.term_key(t) in logging}
        plot_loss_terms(terms, os.path.join(output_folder, 'progress_terms.png'),
                        total=logging['train_losses'][:num_epochs])
