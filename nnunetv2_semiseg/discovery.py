"""Make nnU-Net's trainer search find this package's trainers, with no manual set-up.

nnU-Net 2.8.1 searches its own trainers first, then every folder listed in the ``nnUNet_extTrainer`` environment
variable (``os.pathsep``-separated). Our folder is ``nnunetv2_semiseg/nnunet_ext``; it holds one uniquely named
module of absolute re-exports (see ``docs/discovery`` in the README).

The installed package ships ``nnunetv2_semiseg_discovery.pth`` in site-packages. Python runs its one line at
every interpreter start, which calls :func:`register_ext_trainer_path`: our folder is *appended* to
``nnUNet_extTrainer`` (entries the user already set are kept and searched first). Child processes inherit the
variable and run the ``.pth`` themselves, so DDP workers (``mp.spawn``) find the trainers too.

Manual fallback, e.g. for an install without site-packages ``.pth`` processing (``python -S``):
``eval "$(nnUNetv2_semiseg_print_export)"``.
"""
import os
import sys

ENV_VAR = 'nnUNet_extTrainer'


def ext_trainer_folder() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'nnunet_ext')


def extended_value(current) -> str:
    """``current`` with our folder appended unless it is already listed."""
    folder = ext_trainer_folder()
    entries = [e for e in (current or '').split(os.pathsep) if e.strip()]
    if any(os.path.abspath(e) == folder for e in entries):
        return os.pathsep.join(entries)
    return os.pathsep.join(entries + [folder])


def register_ext_trainer_path() -> None:
    os.environ[ENV_VAR] = extended_value(os.environ.get(ENV_VAR))


def export_line() -> str:
    return f'export {ENV_VAR}="{extended_value(os.environ.get(ENV_VAR))}"'


def print_export_line(argv=None) -> None:
    """Console script ``nnUNetv2_semiseg_print_export``: prints the manual ``export`` line."""
    import argparse
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_print_export',
        description='Print the shell line that makes nnU-Net find the nnunetv2_semiseg trainers '
                    '(use as: eval "$(nnUNetv2_semiseg_print_export)"). Normally not needed: the installed '
                    '.pth file does this at every Python start.')
    parser.parse_args(argv)
    sys.stdout.write(export_line() + '\n')
