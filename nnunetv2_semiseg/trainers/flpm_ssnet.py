"""``nnUNetTrainerSSNetFLPM``: a combination no paper trained, composed from two papers' components."""
from nnunetv2_semiseg.trainers.composed import nnUNetTrainerComposed
from nnunetv2_semiseg.trainers.flpm_components import FeaturePerturbedConsistency
from nnunetv2_semiseg.trainers.ssnet_components import DiceVATSmoothness


class nnUNetTrainerSSNetFLPM(nnUNetTrainerComposed):
    """L = L_sup + w_lds(t) L_lds + lambda_1(t) L_u: SS-Net's Dice-VAT smoothness (weight 1, sigmoid ramp over 40% of
    training) and SFPC's feature-perturbed consistency (weight 0.1, sigmoid ramp over the whole run), each with its
    paper's defaults, over one shared student forward pass."""
    loss_term_names = ('sup', 'lds', 'fpc', 'lds_nonfinite')
    allow_torch_compile = False  # VAT runs autograd.grad inside the network call

    def build_loss_components(self):
        return [DiceVATSmoothness(), FeaturePerturbedConsistency()]
