"""One-factor variants for the weight-sensitivity study of docs/benchmarks.md (issue: "what the gain depends on").

Each changes exactly one default of its trainer; they exist so that ``benchmarks/accuracy_la.py --method <name>``
and ``benchmarks/gpu_suite.py`` can run the study through the stock CLIs. They are not recommendations: a default
changes only for a reason beyond the study's table (see the trainers' docs).
"""
from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
from nnunetv2_semiseg.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet


class nnUNetTrainerMeanTeacher_consistency1(nnUNetTrainerMeanTeacher):
    """Consistency weight 1.0 instead of 0.1 (SSL4MIS's 3D LA script uses 0.1; UA-MT-style scripts reach 1.0)."""
    consistency_weight = 1.0


class nnUNetTrainerMeanTeacher_ramp10(nnUNetTrainerMeanTeacher):
    """Consistency ramp over the first 10 % of training instead of 40 %: full weight sooner on a short schedule."""
    consistency_ramp_length = 0.1


class nnUNetTrainerSSNet_unsupervised01(nnUNetTrainerSSNet):
    """SS-Net's unsupervised weight 0.1 instead of 1.0 (the released code's ACDC consistency weight)."""
    unsupervised_weight = 0.1


class nnUNetTrainerBCP_pretrain25(nnUNetTrainerBCP):
    """Pre-training for 25 % of the iterations instead of 2000/17000 (11.8 %, the paper's LA schedule): the teacher
    starts from a student that has seen the labeled cases about twice as long (75 of 300 iterations)."""
    pretrain_fraction = 0.25


class nnUNetTrainerBCP_pretrain50(nnUNetTrainerBCP):
    """Pre-training for half of the iterations: the far end of the sensitivity study (150 of 300 iterations)."""
    pretrain_fraction = 0.5
