"""The study variants change exactly one default of their trainer, to the documented value, and nnU-Net's trainer
search finds each of them by name."""
import pytest

from nnunetv2_semiseg.trainers import study_variants as sv

# variant -> (parent, attribute, value)
EXPECTED = {
    'nnUNetTrainerMeanTeacher_consistency1': ('nnUNetTrainerMeanTeacher', 'consistency_weight', 1.0),
    'nnUNetTrainerMeanTeacher_ramp10': ('nnUNetTrainerMeanTeacher', 'consistency_ramp_length', 0.1),
    'nnUNetTrainerSSNet_unsupervised01': ('nnUNetTrainerSSNet', 'unsupervised_weight', 0.1),
    'nnUNetTrainerBCP_pretrain25': ('nnUNetTrainerBCP', 'pretrain_fraction', 0.25),
    'nnUNetTrainerBCP_pretrain50': ('nnUNetTrainerBCP', 'pretrain_fraction', 0.5),
}


def _public_attributes(cls):
    return {k: getattr(cls, k) for k in dir(cls) if not k.startswith('_') and not callable(getattr(cls, k))}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_variant_changes_one_default(name):
    parent_name, attribute, value = EXPECTED[name]
    variant = getattr(sv, name)
    parent = variant.__mro__[1]
    assert parent.__name__ == parent_name
    mine, theirs = _public_attributes(variant), _public_attributes(parent)
    changed = {k for k in mine if mine[k] != theirs.get(k)}
    assert changed == {attribute} and mine[attribute] == value


def test_bcp_default_pretraining_is_the_papers_share():
    from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
    assert nnUNetTrainerBCP.pretrain_fraction == pytest.approx(2000 / 17000)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_nnunet_trainer_search_finds_the_variant(name):
    import os
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    import nnunetv2_semiseg.nnunet_ext as ext
    found = recursive_find_python_class(os.path.dirname(ext.__file__), name, 'nnunetv2_semiseg.nnunet_ext')
    assert found is getattr(sv, name)
