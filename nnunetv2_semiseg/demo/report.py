"""What the demo prints: one line per training epoch, the machine's load next to the training times, and the
summary (table, gain in Dice points, what one seed can and cannot say). Pure functions and small classes, so the
tests check the exact lines without training anything."""
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

# nnU-Net's print_to_log_file prefixes every line with "<date> <time>: ".
_TIMESTAMP = re.compile(r'^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ')
_NUMBER = r'(-?[\d.]+(?:e-?\d+)?|nan|inf)'


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask, which a container or taskset may narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def current_load() -> Optional[float]:
    """One-minute load average; None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class EpochProgress:
    """Turns nnU-Net's training output into one line per epoch:
    ``epoch 3/8: train_loss 0.512 (sup 0.447), val_loss 0.601, pseudo Dice 0.71, 12.3 s``.

    Feed it every output line; :meth:`feed` returns a line when an epoch's "Epoch time" arrives (and when training
    ends and the final validation is done), else None. It also
    samples the load average at each epoch end (:attr:`loads`), to tell whether other work shared the CPU."""
    num_epochs: int
    sample_load: bool = True
    loads: List[float] = field(default_factory=list)
    _epoch: Optional[int] = None
    _values: Dict[str, str] = field(default_factory=dict)

    def feed(self, line: str) -> Optional[str]:
        text = _TIMESTAMP.sub('', line.strip())
        match = re.fullmatch(r'Epoch (\d+)', text)
        if match:
            self._epoch, self._values = int(match.group(1)), {}
            return None
        match = re.fullmatch(r'(train_loss|val_loss|train_sup) ' + _NUMBER, text)
        if match:
            self._values[match.group(1)] = match.group(2)
            return None
        match = re.fullmatch(r'Pseudo dice \[(.*)\]', text)
        if match:   # "[np.float32(0.71), np.float32(0.52)]" or "[0.71]": the numbers, rounded
            numbers = re.findall(r'(?<![\w.])(\d*\.\d+|\d+)(?![\w.])', match.group(1).replace('np.float32', ''))
            self._values['dice'] = ' / '.join(f'{float(n):.2f}' for n in numbers)
            return None
        if text == 'Training done.':   # nnU-Net's final validation follows: minutes on a CPU, say so
            return 'training done; nnU-Net now predicts its validation cases (final validation)'
        match = re.fullmatch(r'Mean Validation Dice: +' + _NUMBER, text)
        if match:
            return f'final validation: mean Dice {float(match.group(1)):.3f}'
        match = re.fullmatch(r'Epoch time: ' + _NUMBER + ' s', text)
        if match and self._epoch is not None:
            if self.sample_load:
                load = current_load()
                if load is not None:
                    self.loads.append(load)
            return self._line(float(match.group(1)))
        return None

    def _line(self, seconds: float) -> str:
        v = self._values
        parts = []
        if 'train_loss' in v:
            parts.append(f'train_loss {float(v["train_loss"]):.3f}'
                         + (f' (sup {float(v["train_sup"]):.3f})' if 'train_sup' in v else ''))
        if 'val_loss' in v:
            parts.append(f'val_loss {float(v["val_loss"]):.3f}')
        if 'dice' in v:
            parts.append(f'pseudo Dice {v["dice"]}')
        parts.append(f'{seconds:.1f} s')
        return f'epoch {self._epoch + 1}/{self.num_epochs}: ' + ', '.join(parts)

    @property
    def mean_load(self) -> Optional[float]:
        return sum(self.loads) / len(self.loads) if self.loads else None


def is_loaded(load: Optional[float], cores: int) -> bool:
    """A CPU training alone keeps about ``cores`` threads busy (nnU-Net sets torch's threads to the core count),
    so a load average well above that means other work shared the machine and slowed the run."""
    return load is not None and load > 1.5 * cores


def time_with_load(seconds: float, load: Optional[float], cores: int) -> str:
    """The training time as the table shows it, with the load when the machine was busy."""
    if is_loaded(load, cores):
        return f'{seconds:.0f} s (loaded machine: load {load:.1f} on {cores} cores)'
    return f'{seconds:.0f} s'


def format_summary(results: Dict[str, dict], baseline: str, num_labeled: int, num_unlabeled: int, num_test: int,
                   seed: int, cores: int) -> List[str]:
    """The demo's closing lines. ``results[trainer]``: ``dice``, ``hd95_voxel``, ``train_seconds`` and optionally
    ``load`` (mean load average during its training). The semi-supervised trainer is the one that is not
    ``baseline``."""
    lines = ['| trainer | labeled / unlabeled cases | test Dice | test 95HD (voxels) | training time |',
             '|---|---|---|---|---|']
    for name, r in results.items():
        used = f'{num_labeled} / {0 if name == baseline else num_unlabeled}'
        lines.append(f'| {name} | {used} | {r["dice"]:.4f} | {r["hd95_voxel"]:.2f} | '
                     f'{time_with_load(r["train_seconds"], r.get("load"), cores)} |')
    lines.append('')
    others = [n for n in results if n != baseline]
    if baseline in results and others:
        name = others[0]
        gain = 100.0 * (results[name]['dice'] - results[baseline]['dice'])
        lines.append(f'Gain of {name} over supervised nnU-Net: {gain:+.1f} Dice points '
                     f'({100 * results[name]["dice"]:.1f} vs {100 * results[baseline]["dice"]:.1f} % mean Dice on '
                     f'{num_test} test cases).')
        lines.append(f'This is one seed (--seed {seed}) on one short schedule: an example of the whole chain, not a '
                     f'significance test. Another seed can change the sign of a small gain; compare methods over '
                     f'several seeds with paired statistics (benchmarks/).')
    if any(is_loaded(r.get('load'), cores) for r in results.values()):
        lines.append(f'Training times were taken on a loaded machine (load average above 1.5 x its {cores} cores): '
                     f'other work shared the CPU, so they are longer than on an idle machine and not comparable '
                     f'between the two trainings.')
    return lines
