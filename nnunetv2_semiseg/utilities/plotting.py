"""Plot of the per-term training losses, drawn next to nnU-Net's progress.png."""
import os
from typing import Dict, List

import matplotlib

matplotlib.use('agg')
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_terms(terms: Dict[str, List[float]], filename: str) -> None:
    """One curve per loss term (one value per epoch). Written to a temporary file, then renamed."""
    num_epochs = min((len(v) for v in terms.values()), default=0)
    if num_epochs == 0:
        return
    fig, ax = plt.subplots(figsize=(12, 6))
    epochs = list(range(num_epochs))
    for name, values in terms.items():
        ax.plot(epochs, values[:num_epochs], label=name, linewidth=2, marker='o' if num_epochs < 20 else None)
    ax.set_xlabel('epoch')
    ax.set_ylabel('loss term (mean over the epoch\'s iterations)')
    ax.set_title('semi-supervised loss terms')
    ax.legend(loc='best')
    fig.tight_layout()
    tmp = filename + '.tmp.png'
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, filename)
