"""Largest-connected-component (LCC) post-processing, as in the SS-Net / BCP evaluation protocol.

SS-Net's and BCP's LA test scripts (``test_LA.py`` with the default ``--nms 1``) keep only the largest connected
component of the binary foreground prediction before computing metrics; they label components with
``skimage.measure.label``, whose default connectivity is the full one (26-neighbourhood in 3D, 8 in 2D). This
module does the same with ``scipy.ndimage.label`` and the same default connectivity. The step is applied to the
prediction only, never to the reference.

Ties (several components of the same, largest size) keep the component that comes first in C (raster) order of
the array, which is what ``np.argmax`` over the component sizes in those scripts does.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage


def largest_connected_component(mask: np.ndarray, connectivity: Optional[int] = None) -> np.ndarray:
    """Return a boolean mask holding only the largest connected component of ``mask`` (non-zero = object).

    ``connectivity``: as in ``scipy.ndimage.generate_binary_structure`` (1 = face neighbours, ``mask.ndim`` = full
    neighbourhood); None (default) = full, matching ``skimage.measure.label`` used by SS-Net/BCP. An empty mask is
    returned unchanged (empty).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if connectivity is None:
        connectivity = mask.ndim
    if not 1 <= connectivity <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be between 1 and {mask.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    # ndimage.label numbers components in raster order of their first voxel, so argmax breaks ties by that order
    return components == int(np.argmax(sizes))


def keep_largest_component_per_label(
    segmentation: np.ndarray, labels=None, connectivity: Optional[int] = None
) -> np.ndarray:
    """Apply :func:`largest_connected_component` to each label of an integer label map.

    Voxels of the removed components become background (0). ``labels``: the labels to process (default: every
    value > 0 present). Returns a new array of the input dtype.
    """
    segmentation = np.asarray(segmentation)
    out = segmentation.copy()
    if labels is None:
        labels = [int(v) for v in np.unique(segmentation) if v > 0]
    for lab in labels:
        mask = segmentation == lab
        if not mask.any():
            continue
        out[mask & ~largest_connected_component(mask, connectivity)] = 0
    return out
