"""SS-Net's training-only heads on the last decoder feature map (methods.md §2.2 table).

* projector Phi:       Linear(F, 32) - BatchNorm1d - ReLU - Linear(32, 32)      (F = nnU-Net's last decoder width)
* predictor Psi:       Linear(32, 32) - BatchNorm1d - ReLU - Linear(32, 32)
* selectors A_f^c, A_z^c (one pair per output channel): Linear(32, 32) - BatchNorm1d - LeakyReLU(0.2) - Linear(32, 1)

The heads act on per-voxel vectors (rows), so the module is the same for 2D and 3D networks. They live in the
network wrapper (``network.heads.*``) so that they are trained with the student and DDP sees them; inference never
calls them (``SemiSegNetwork.forward(x)`` ignores ``heads``), and the plain export drops their keys.
"""
import torch
import torch.nn.functional as F
from torch import nn


class RowBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` over rows (n, C): same parameters, buffers, state-dict keys and arithmetic.

    Deliberately not a ``_BatchNorm`` subclass: nnU-Net's DDP set-up runs ``convert_sync_batchnorm`` on the whole
    network, and SyncBatchNorm needs every rank to call each layer equally often, whereas the selectors of a class
    are only called on ranks whose batch holds that class. The heads therefore normalise per rank, as the
    single-GPU original does; their running statistics are kept in sync by DDP's buffer broadcast.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.ones(num_features))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                            self.momentum, self.eps)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, activation: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), RowBatchNorm(hidden_dim), activation,
                         nn.Linear(hidden_dim, out_dim))


class SSNetHeads(nn.Module):
    """Projector, predictor and per-class attention selectors of SS-Net.

    ``num_classes`` is the number of network output channels; selector pairs exist for each of them (index =
    output channel; for softmax outputs the background pair is never used, since background has no prototypes).
    Use the named methods; there is deliberately no ``forward``.
    """

    def __init__(self, in_channels: int, num_classes: int, embedding_dim: int = 32, hidden_dim: int = 32):
        super().__init__()
        self.in_channels, self.num_classes, self.embedding_dim = in_channels, num_classes, embedding_dim
        self.projector = _mlp(in_channels, hidden_dim, embedding_dim, nn.ReLU(inplace=True))
        self.predictor = _mlp(embedding_dim, hidden_dim, embedding_dim, nn.ReLU(inplace=True))
        self.feature_selectors = nn.ModuleList(
            [_mlp(embedding_dim, hidden_dim, 1, nn.LeakyReLU(0.2, inplace=True)) for _ in range(num_classes)])
        self.memory_selectors = nn.ModuleList(
            [_mlp(embedding_dim, hidden_dim, 1, nn.LeakyReLU(0.2, inplace=True)) for _ in range(num_classes)])

    def project(self, voxel_features):
        """Phi: (n, F) -> (n, 32)."""
        return self.projector(voxel_features)

    def project_and_predict(self, voxel_features):
        """Psi(Phi(.)): (n, F) -> (n, 32), the vectors pulled towards the prototypes."""
        return self.predictor(self.projector(voxel_features))

    def feature_score(self, class_index: int, embeddings):
        """sigmoid(A_f^c(.)) -> (n,): weights of feature-side vectors and ranking of memory candidates."""
        return self.feature_selectors[class_index](embeddings).squeeze(1).sigmoid()

    def memory_score(self, class_index: int, prototypes):
        """sigmoid(A_z^c(.)) -> (n,): weights of the memory-side vectors."""
        return self.memory_selectors[class_index](prototypes).squeeze(1).sigmoid()
