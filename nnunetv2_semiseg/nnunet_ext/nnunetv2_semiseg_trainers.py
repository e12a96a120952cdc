# Discovery shim for nnU-Net's trainer search (nnUNet_extTrainer). nnU-Net imports every module of this folder as
# a top-level module, so this file only re-exports our trainers by absolute import: the classes keep their
# canonical module (picklable, one class object per process). Keep this folder free of anything else.
from nnunetv2_semiseg.trainers.mean_teacher import (nnUNetTrainerMeanTeacher,  # noqa: F401
                                                    nnUNetTrainerMeanTeacher_consistencyAllRows)
from nnunetv2_semiseg.trainers.schedule import nnUNetTrainer_semisegSchedule  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_lowestScorePrototypes  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_noLDS  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_noCS  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_KL  # noqa: F401
from nnunetv2_semiseg.trainers.ssnet import nnUNetTrainerSSNet_ACDC  # noqa: F401
from nnunetv2_semiseg.trainers.flpm import (nnUNetTrainerFLPM, nnUNetTrainerFLPM_L1,  # noqa: F401
                                            nnUNetTrainerFLPM_fullRec, nnUNetTrainerFLPM_noFPC,
                                            nnUNetTrainerFLPM_noNormAfter,
                                            nnUNetTrainerFLPM_noRec)
from nnunetv2_semiseg.trainers.flpm_ssnet import nnUNetTrainerSSNetFLPM  # noqa: F401
from nnunetv2_semiseg.trainers.dualstream import (nnUNetTrainerDualStream,  # noqa: F401
                                                  nnUNetTrainerDualStream_noConsistency,
                                                  nnUNetTrainerDualStream_noContrast,
                                                  nnUNetTrainerDualStream_noUncertainty,
                                                  nnUNetTrainerDualStream_releasedCode,
                                                  nnUNetTrainerDualStream_resEncM)
from nnunetv2_semiseg.trainers.study_variants import (nnUNetTrainerBCP_pretrain25,  # noqa: F401
                                                      nnUNetTrainerBCP_pretrain50,
                                                      nnUNetTrainerMeanTeacher_consistency1,
                                                      nnUNetTrainerMeanTeacher_ramp10,
                                                      nnUNetTrainerSSNet_unsupervised01)
from nnunetv2_semiseg.trainers.bcp import (nnUNetTrainerBCP, nnUNetTrainerBCP_noLCC,  # noqa: F401
                                           nnUNetTrainerBCP_noPretrain, nnUNetTrainerBCP_oneDirection)
from nnunetv2_semiseg.trainers.bcp_flpm import nnUNetTrainerBCPFLPM  # noqa: F401
from nnunetv2_semiseg.trainers.voxel_adversarial import (nnUNetTrainerVoxelAdversarial,  # noqa: F401
                                                         nnUNetTrainerVoxelAdversarial_beta100,
                                                         nnUNetTrainerVoxelAdversarial_noAdv,
                                                         nnUNetTrainerVoxelAdversarial_noConsistency,
                                                         nnUNetTrainerVoxelAdversarial_noFeature)
