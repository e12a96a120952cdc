"""The two training pictures of the semi-supervised trainers: ``progress.png`` and ``progress_terms.png``.

``draw_*`` build a figure (the tests inspect it), ``plot_*`` draw and save it. Both draw under matplotlib's default
style: nnU-Net's own ``LocalLogger.plot_progress_png`` calls ``seaborn.set(font_scale=2.5)``, which changes the
process-wide settings, and a figure drawn after it in the same process got fonts too large for it (the y-label of
``progress_terms.png`` was cut off and its legend covered the curves).
"""
import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Legends go to the right of the axes, outside them, so that they never cover a curve.
_LEGEND_OUTSIDE = dict(loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Figure, filename: str) -> None:
    """Save under a temporary name, then rename: a viewer never sees a half-written file."""
    tmp = filename + '.tmp.png'
    # bbox_inches='tight' grows the canvas to everything drawn, the outside legend and the axis labels included.
    fig.savefig(tmp, bbox_inches='tight')
    plt.close(fig)
    os.replace(tmp, filename)


def _epoch_axis(ax) -> None:
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # no "epoch 0.5" ticks on short runs


def _marker(num_epochs: int) -> Optional[str]:
    return 'o' if num_epochs < 20 else None  # a few epochs: show the points, a line alone hides how few they are


def draw_loss_terms(terms: Dict[str, Sequence[float]], total: Optional[Sequence[float]] = None) -> Optional[Figure]:
    """One curve per loss term (one value per epoch) and, if given, the total that was optimised.
    None when no epoch is complete."""
    lengths = [len(v) for v in terms.values()] + ([len(total)] if total is not None else [])
    num_epochs = min(lengths, default=0)
    if num_epochs == 0:
        return None
    epochs = list(range(num_epochs))
    with plt.style.context('default'):
        fig, ax = plt.subplots(figsize=(12, 6))
        if total is not None:
            ax.plot(epochs, list(total)[:num_epochs], color='black', linewidth=3, label='total (optimised)',
                    marker=_marker(num_epochs))
        for name, values in terms.items():
            ax.plot(epochs, list(values)[:num_epochs], label=name, linewidth=2, marker=_marker(num_epochs))
        _epoch_axis(ax)
        ax.set_ylabel('loss (mean over the epoch)')
        # The terms are logged before their weights and ramps, so the total is not their plain sum.
        ax.set_title('training loss: total and terms (terms before their weights)')
        ax.grid(alpha=0.3)
        ax.legend(**_LEGEND_OUTSIDE)
    return fig


def plot_loss_terms(terms: Dict[str, Sequence[float]], filename: str,
                    total: Optional[Sequence[float]] = None) -> None:
    """:func:`draw_loss_terms`, saved to ``filename`` (nothing is written before the first epoch ends)."""
    fig = draw_loss_terms(terms, total)
    if fig is not None:
        _save(fig, filename)


def draw_progress(train_loss: Sequence[float], train_label: str, logging: Dict[str, List],
                  num_epochs: int) -> Figure:
    """nnU-Net's three progress panels, with ``train_loss`` (labelled ``train_label``) as the training curve:
    training vs validation loss with the pseudo Dice, epoch duration, learning rate."""
    epochs = list(range(num_epochs))
    marker = _marker(num_epochs)
    with plt.style.context('default'):
        # constrained layout keeps room for the legends outside the axes
        fig, (ax_loss, ax_time, ax_lr) = plt.subplots(3, 1, figsize=(12, 14), layout='constrained')
        ax_dice = ax_loss.twinx()
        ax_loss.plot(epochs, list(train_loss)[:num_epochs], color='b', linewidth=2.5, marker=marker,
                     label=train_label)
        ax_loss.plot(epochs, logging['val_losses'][:num_epochs], color='r', linewidth=2.5, marker=marker,
                     label='loss_val (supervised, validation cases)')
        ax_dice.plot(epochs, logging['mean_fg_dice'][:num_epochs], color='g', ls='dotted', linewidth=2,
                     label='pseudo dice')
        ax_dice.plot(epochs, logging['ema_fg_dice'][:num_epochs], color='g', linewidth=2.5,
                     label='pseudo dice (mov. avg.)')
        _epoch_axis(ax_loss)
        ax_loss.set_ylabel('loss')
        ax_dice.set_ylabel('pseudo dice')
        ax_loss.set_title('training vs validation loss (total loss and every term: progress_terms.png)')
        ax_loss.grid(alpha=0.3)
        # One legend for both y-axes, below the panel: the twin axis leaves no room on the right.
        handles = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
        ax_loss.legend(handles, [h.get_label() for h in handles], loc='upper left', bbox_to_anchor=(0.0, -0.12),
                       ncol=2, borderaxespad=0.0)

        durations = [end - start for start, end in zip(logging['epoch_start_timestamps'][:num_epochs],
                                                       logging['epoch_end_timestamps'][:num_epochs])]
        # An uneven duration usually means other jobs share the machine.
        ax_time.plot(epochs, durations, color='b', linewidth=2.5, marker=marker, label='epoch duration')
        ax_time.set_ylim(0, max(durations + [1e-9]) * 1.1)
        _epoch_axis(ax_time)
        ax_time.set_ylabel('time [s]')
        ax_time.grid(alpha=0.3)
        ax_time.legend(**_LEGEND_OUTSIDE)

        ax_lr.plot(epochs, logging['lrs'][:num_epochs], color='b', linewidth=2.5, marker=marker,
                   label='learning rate')
        _epoch_axis(ax_lr)
        ax_lr.set_ylabel('learning rate')
        ax_lr.grid(alpha=0.3)
        ax_lr.legend(**_LEGEND_OUTSIDE)
    return fig


def plot_progress(train_loss: Sequence[float], train_label: str, logging: Dict[str, List], num_epochs: int,
                  filename: str) -> None:
    """:func:`draw_progress`, saved to ``filename``."""
    if num_epochs > 0:
        _save(draw_progress(train_loss, train_label, logging, num_epochs), filename)
