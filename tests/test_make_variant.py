"""nnUNetv2_semiseg_make_variant: the written file, nnU-Net's trainer search finding it, and the refusals."""
import os
import subprocess
import sys

import pytest

from nnunetv2_semiseg.make_variant import VariantError, make_variant


@pytest.fixture
def ext_folder(tmp_path, monkeypatch):
    folder = tmp_path / 'my_trainers'
    from nnunetv2_semiseg.discovery import ext_trainer_folder
    # The user's folder first, ours appended, as the installed .pth leaves the variable.
    monkeypatch.setenv('nnUNet_extTrainer', os.pathsep.join([str(folder), ext_trainer_folder()]))
    return folder


def test_variant_file_is_found_by_nnunet_search_with_the_new_value(ext_folder):
    path = make_variant('nnUNetTrainerBCP', ['u_weight=0.3', 'keep_largest_component=false'],
                        'nnUNetTrainerBCP_uw03')
    # Default folder: the first nnUNet_extTrainer entry that is not ours; created.
    assert path == str(ext_folder / 'nnUNetTrainerBCP_uw03.py')
    text = open(path).read()
    assert 'from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP\n' in text
    assert 'class nnUNetTrainerBCP_uw03(nnUNetTrainerBCP):\n    u_weight = 0.3\n    keep_largest_component = False\n' \
        in text
    assert not [f for f in os.listdir(ext_folder) if f.startswith('.tmp_')]

    # The same search nnUNetv2_train runs (discovery.py: recursive_find_python_class over each extTrainer entry).
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(str(ext_folder), 'nnUNetTrainerBCP_uw03', None, base_folder=str(ext_folder),
                                      cleanup_imports_from_base_folder=True)
    from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP
    assert cls is not None and issubclass(cls, nnUNetTrainerBCP)
    assert cls.u_weight == 0.3 and cls.keep_largest_component is False
    assert nnUNetTrainerBCP.u_weight == 0.5  # the base is untouched

    # The name is now taken (by this file): refused again without --overwrite, replaced with it.
    with pytest.raises(VariantError, match=r'nnUNetTrainerBCP_uw03.py exists; pass --overwrite'):
        make_variant('nnUNetTrainerBCP', ['u_weight=0.2'], 'nnUNetTrainerBCP_uw03')
    make_variant('nnUNetTrainerBCP', ['u_weight=0.2'], 'nnUNetTrainerBCP_uw03', overwrite=True)
    assert '    u_weight = 0.2\n' in open(path).read()


def test_variant_of_an_nnunet_trainer_and_optional_int_attribute(ext_folder, tmp_path):
    out = tmp_path / 'elsewhere'
    path = make_variant('nnUNetTrainerMeanTeacher', ['unlabeled_batch_size=4', 'consistency_weight=1'],
                        'nnUNetTrainerMeanTeacher_ub4', output_folder=str(out))
    text = open(path).read()
    # None default, annotated Optional[int]: parsed as int; a float attribute given "1" is written as 1.0.
    assert '    unlabeled_batch_size = 4\n    consistency_weight = 1.0\n' in text
    with pytest.raises(VariantError, match=r'unlabeled_batch_size=four: nnUNetTrainerMeanTeacher.'
                                           r'unlabeled_batch_size is of type int \(current value None\); '
                                           r'expected an integer'):
        make_variant('nnUNetTrainerMeanTeacher', ['unlabeled_batch_size=four'], 'X_ub', output_folder=str(out))


def test_refusals_name_the_attribute_type_value_and_fix(ext_folder):
    with pytest.raises(VariantError) as info:
        make_variant('nnUNetTrainerBCP', ['u_weigth=0.3'], 'nnUNetTrainerBCP_x')
    message = str(info.value)
    assert "has no class attribute 'u_weigth'" in message and 'Close attribute names: u_weight' in message

    with pytest.raises(VariantError, match=r'--set u_weight=abc: nnUNetTrainerBCP.u_weight is of type float '
                                           r'\(current value 0.5\); expected a number'):
        make_variant('nnUNetTrainerBCP', ['u_weight=abc'], 'nnUNetTrainerBCP_x')
    with pytest.raises(VariantError, match=r'bidirectional is of type bool \(current value True\); '
                                           r'expected True or False'):
        make_variant('nnUNetTrainerBCP', ['bidirectional=maybe'], 'nnUNetTrainerBCP_x')
    # Schedule attributes are set in nnU-Net's __init__: pointed to the hand-written variant.
    with pytest.raises(VariantError, match=r'sets num_epochs in __init__.*self.num_epochs after super'):
        make_variant('nnUNetTrainerBCP', ['num_epochs=10'], 'nnUNetTrainerBCP_x')

    with pytest.raises(VariantError, match=r"--name '3d-bcp' is not a valid Python class name"):
        make_variant('nnUNetTrainerBCP', ['u_weight=0.3'], '3d-bcp')
    with pytest.raises(VariantError, match=r'--name nnUNetTrainerBCP_noLCC: a trainer of that name already exists '
                                           r'\(nnunetv2_semiseg.trainers.bcp\)'):
        make_variant('nnUNetTrainerBCP', ['u_weight=0.3'], 'nnUNetTrainerBCP_noLCC')
    with pytest.raises(VariantError, match=r'--name nnUNetTrainer_5epochs: a trainer of that name already exists'):
        make_variant('nnUNetTrainerBCP', ['u_weight=0.3'], 'nnUNetTrainer_5epochs')
    with pytest.raises(VariantError, match=r'Trainer nnUNetTrainerBPC not found'):
        make_variant('nnUNetTrainerBPC', ['u_weight=0.3'], 'nnUNetTrainerBPC_x')
    assert not ext_folder.exists()  # nothing written by a refused request


def test_no_folder_without_a_user_entry_asks_for_o(monkeypatch):
    from nnunetv2_semiseg.discovery import ext_trainer_folder
    monkeypatch.setenv('nnUNet_extTrainer', ext_trainer_folder())  # only ours: never written into
    with pytest.raises(VariantError, match=r'No folder to write to.*Pass -o DIR'):
        make_variant('nnUNetTrainerBCP', ['u_weight=0.3'], 'nnUNetTrainerBCP_x')


def test_command_line_prints_the_usage(tmp_path):
    env = dict(os.environ, nnUNet_extTrainer='', PYTHONPATH=os.pathsep.join(sys.path))
    out = tmp_path / 'v'
    proc = subprocess.run([sys.executable, '-m', 'nnunetv2_semiseg.make_variant', 'nnUNetTrainerSSNet', '--set',
                           'unsupervised_weight=0.5', '--name', 'nnUNetTrainerSSNet_uw05', '-o', str(out)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f'export nnUNet_extTrainer="{out}"' in proc.stdout
    assert 'nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainerSSNet_uw05' in proc.stdout
    assert (out / 'nnUNetTrainerSSNet_uw05.py').is_file()


def test_command_line_error_exits_2_with_the_reason(capsys, tmp_path):
    from nnunetv2_semiseg.make_variant import main
    with pytest.raises(SystemExit) as info:
        main(['nnUNetTrainerSSNet', '--set', 'unsupervised_weight', '--name', 'nnUNetTrainerSSNet_x', '-o',
              str(tmp_path)])
    assert info.value.code == 2
    assert "--set 'unsupervised_weight': expected NAME=VALUE" in capsys.readouterr().err


def test_variant_of_a_users_own_trainer_lives_next_to_it(ext_folder, tmp_path):
    # A trainer of the user's ext folder is importable only while nnU-Net searches that folder.
    ext_folder.mkdir()
    (ext_folder / 'my_trainers.py').write_text(
        'from nnunetv2_semiseg.trainers.bcp import nnUNetTrainerBCP\n\n\n'
        'class nnUNetTrainerMine(nnUNetTrainerBCP):\n    mask_beta = 0.5\n\n'
        '    def switch_step(self):\n        return 0\n')
    with pytest.raises(VariantError, match=rf'nnUNetTrainerMine is imported from {ext_folder} only while nnU-Net '
                                           rf'searches that folder.*pass -o {ext_folder}'):
        make_variant('nnUNetTrainerMine', ['mask_beta=0.25'], 'nnUNetTrainerMine_b25',
                     output_folder=str(tmp_path / 'other'))
    path = make_variant('nnUNetTrainerMine', ['mask_beta=0.25'], 'nnUNetTrainerMine_b25')
    assert 'from my_trainers import nnUNetTrainerMine\n' in open(path).read()
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(str(ext_folder), 'nnUNetTrainerMine_b25', None, base_folder=str(ext_folder),
                                      cleanup_imports_from_base_folder=True)
    assert cls.mask_beta == 0.25 and cls.__mro__[1].__name__ == 'nnUNetTrainerMine'
