"""Metrics in the semi-supervised segmentation literature's conventions and the evaluation command."""

from nnunetv2_semiseg.evaluation.evaluate import EvaluationError, evaluate_folders
from nnunetv2_semiseg.evaluation.metrics import (METRIC_KEYS, asd, assd, compute_binary_metrics, dice, hd95,
                                                 jaccard)
from nnunetv2_semiseg.evaluation.postprocessing import (keep_largest_component_per_label,
                                                        largest_connected_component)

__all__ = ["EvaluationError", "evaluate_folders", "METRIC_KEYS", "asd", "assd", "compute_binary_metrics", "dice",
           "hd95", "jaccard", "keep_largest_component_per_label", "largest_connected_component"]
