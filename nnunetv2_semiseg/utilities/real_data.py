"""Where the real LA / ACDC h5 releases are, for the tests on real data and the benchmarks.

``nnUNet_semiseg_LA_h5`` and ``nnUNet_semiseg_ACDC_h5`` point at a copy of the LA release of UA-MT
(Yu et al., MICCAI 2019, https://github.com/yulequan/UA-MT) and the ACDC release of SSL4MIS
(https://github.com/HiLab-git/SSL4MIS). Unset, the folders default to the subsets next to this repository
(``../shared/data/la_h5_uamt_subset`` and ``../shared/data/acdc_h5_ssl4mis_subset`` relative to the repo root).
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REAL_DATA = {
    'LA': ('nnUNet_semiseg_LA_h5', os.path.join('..', 'shared', 'data', 'la_h5_uamt_subset')),
    'ACDC': ('nnUNet_semiseg_ACDC_h5', os.path.join('..', 'shared', 'data', 'acdc_h5_ssl4mis_subset')),
}


def real_data_folder(dataset: str) -> str:
    """Absolute path of the h5 release of ``dataset`` ('LA' or 'ACDC'): the environment variable when set and
    non-empty, else the default next to the repository. The folder may not exist; callers skip or fail."""
    try:
        variable, default = REAL_DATA[dataset]
    except KeyError:
        raise ValueError(f'Unknown real data set {dataset!r}; known: {sorted(REAL_DATA)}') from None
    value = os.environ.get(variable, '').strip()
    return os.path.abspath(os.path.expanduser(value)) if value else os.path.normpath(os.path.join(_REPO, default))
