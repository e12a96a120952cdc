#!/usr/bin/env python
"""The accuracy benchmark on real data, one command for every dataset:

    python benchmarks/accuracy.py --dataset la   --method supervised_a nnUNetTrainerBCP --epochs 15 \\
        --iterations-per-epoch 20 --val-iterations 2 [--seed S] [--labeled-draw K]
    python benchmarks/accuracy.py --dataset acdc --method supervised_a --epochs 15 --iterations-per-epoch 20 \\
        --val-iterations 2 [--inplane-factor F]
    python benchmarks/accuracy.py --dataset acdc --smoke --work /tmp/x

Everything after ``--dataset NAME`` goes to that dataset's benchmark (``accuracy_la.py``, ``accuracy_acdc.py``;
``--help`` there lists the options). The shared machinery is ``accuracy_common.py``.
"""
import os
import sys

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
if SCRIPT_DIR not in sys.path:
    sys.path.insert(0, SCRIPT_DIR)

DATASETS = {'la': 'accuracy_la', 'acdc': 'accuracy_acdc'}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--dataset' not in argv or argv.index('--dataset') + 1 >= len(argv):
        print(__doc__, file=sys.stderr)
        print(f'error: --dataset {{{",".join(DATASETS)}}} is required', file=sys.stderr)
        return 2
    i = argv.index('--dataset')
    name = argv[i + 1].lower()
    if name not in DATASETS:
        print(f'error: --dataset {argv[i + 1]!r}: choose one of {", ".join(DATASETS)}', file=sys.stderr)
        return 2
    del argv[i:i + 2]
    module = __import__(DATASETS[name])
    return module.main(argv)


if __name__ == '__main__':
    raise SystemExit(main())
