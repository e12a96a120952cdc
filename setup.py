"""Only here to ship ``nnunetv2_semiseg_discovery.pth`` into site-packages (metadata lives in setup.cfg).

The .pth line registers our trainer folder in ``nnUNet_extTrainer`` at interpreter start, so the stock
``nnUNetv2_train``/``nnUNetv2_predict`` find our trainers with no manual set-up (see nnunetv2_semiseg/discovery.py).
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_FILE = 'nnunetv2_semiseg_discovery.pth'
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH_FILE), os.path.join(self.build_lib, PTH_FILE), preserve_mode=0)
        if getattr(self, 'editable_mode', False):
            # An editable wheel only links the packages; files for site-packages must go into the unpacked
            # wheel's <name>.data/purelib folder, which sits next to the data folder setuptools configured.
            install_data = self.distribution.get_command_obj('install').install_data
            if install_data and os.path.basename(os.path.dirname(install_data)).endswith('.data'):
                purelib = os.path.join(os.path.dirname(install_data), 'purelib')
                self.mkpath(purelib)
                self.copy_file(os.path.join(HERE, PTH_FILE), os.path.join(purelib, PTH_FILE), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + [os.path.join(self.build_lib, PTH_FILE)]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        mapping[os.path.join(self.build_lib, PTH_FILE)] = os.path.join(HERE, PTH_FILE)
        return mapping


setup(cmdclass={'build_py': build_py_with_pth})
