"""``nnUNetv2_semiseg_make_variant``: write a one-change trainer variant (nnU-Net's convention) without writing Python.

    nnUNetv2_semiseg_make_variant nnUNetTrainerBCP --set u_weight=0.3 --name nnUNetTrainerBCP_uw03 [-o DIR]

finds the base trainer the way ``nnUNetv2_train -tr`` does (nnU-Net's own trainers, then the folders on
``nnUNet_extTrainer``), checks that every ``--set`` names a class attribute of it and that the value parses to that
attribute's type, and writes ``DIR/<name>.py`` holding a subclass that overrides only those attributes. A variant
is a new class name, so nnU-Net trains it into its own output folder (``<name>__<plans>__<configuration>``): runs
with different hyperparameters never share a folder or a ``--c``.
"""
import argparse
import ast
import difflib
import inspect
import keyword
import os
import sys
import tempfile
import typing
from typing import Dict, List, Optional, Sequence, Tuple

from nnunetv2_semiseg.discovery import ENV_VAR, ext_trainer_folder

TRUE_WORDS = ('true', '1', 'yes', 'on')
FALSE_WORDS = ('false', '0', 'no', 'off')


class VariantError(ValueError):
    """A variant request that cannot be written; the message names the offending argument and the fix."""


# ------------------------------------------------------------------------------------------------------------------
# finding trainers
def find_trainer(name: str):
    """The trainer class nnUNetv2_train would use for ``-tr name``, or None. nnU-Net's search prints what it
    inspects; that noise is kept out of this command's output."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError:
            return None


def ext_trainer_entries() -> List[str]:
    return [e for e in os.environ.get(ENV_VAR, '').split(os.pathsep) if e.strip()]


def default_output_folder() -> Optional[str]:
    """The first user folder on nnUNet_extTrainer. Our own shim folder (appended at every interpreter start) is
    skipped: it belongs to the installed package and is replaced by the next install."""
    ours = os.path.abspath(ext_trainer_folder())
    for entry in ext_trainer_entries():
        if os.path.abspath(entry) != ours:
            return entry
    return None


# ------------------------------------------------------------------------------------------------------------------
# attributes and values
def class_attribute_names(cls) -> List[str]:
    """Public, non-callable class attributes along the MRO (the hyperparameters a variant can change)."""
    names = set()
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if name.startswith('_') or callable(value) or isinstance(value, (property, staticmethod, classmethod)):
                continue
            names.add(name)
    return sorted(names)


def init_assigned_names(cls) -> List[str]:
    """Attributes the trainers' ``__init__`` methods assign (``self.num_epochs = 1000`` in nnU-Net's): they are not
    class attributes, so a class-level override would be overwritten at construction."""
    names = set()
    for klass in cls.__mro__:
        init = vars(klass).get('__init__')
        if init is None:
            continue
        try:
            tree = ast.parse(inspect.cleandoc('\n' + inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == 'self':
                        names.add(t.attr)
    return sorted(names)


def annotated_type(cls, name: str):
    """The declared type of an attribute whose default is None (``unlabeled_batch_size: Optional[int] = None``)."""
    for klass in cls.__mro__:
        annotation = vars(klass).get('__annotations__', {}).get(name)
        if annotation is None:
            continue
        if isinstance(annotation, str):
            return None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is typing.Union and len(args) == 1:
            return args[0]
        if annotation in (bool, int, float, str, tuple):
            return annotation
    return None


def type_label(value_type) -> str:
    return getattr(value_type, '__name__', str(value_type))


def parse_value(text: str, value_type, allow_none: bool):
    """``text`` as a value of ``value_type``; raises ValueError with the accepted spelling."""
    stripped = text.strip()
    if allow_none and stripped == 'None':
        return None
    if value_type is bool:
        if stripped.lower() in TRUE_WORDS:
            return True
        if stripped.lower() in FALSE_WORDS:
            return False
        raise ValueError('expected True or False')
    if value_type is int:
        try:
            return int(stripped)
        except ValueError:
            raise ValueError('expected an integer, e.g. 2') from None
    if value_type is float:
        try:
            return float(stripped)
        except ValueError:
            raise ValueError('expected a number, e.g. 0.3') from None
    if value_type is str:
        return text
    if value_type is tuple:
        try:
            parsed = ast.literal_eval(stripped if stripped.startswith(('(', '[')) else f'({stripped},)')
        except (ValueError, SyntaxError):
            raise ValueError('expected a tuple of Python literals, e.g. (1, 2) or 1,2') from None
        if not isinstance(parsed, (tuple, list)):
            raise ValueError('expected a tuple of Python literals, e.g. (1, 2) or 1,2')
        return tuple(parsed)
    if value_type is None:  # default None and no annotation: any plain literal
        try:
            parsed = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            raise ValueError('expected a Python literal (a number, True/False, None, a quoted string)') from None
        if not isinstance(parsed, (bool, int, float, str, tuple, type(None))):
            raise ValueError('expected a number, True/False, None, a quoted string or a tuple')
        return parsed
    raise ValueError(f'attributes of type {type_label(value_type)} cannot be set from the command line')


def parse_assignment(cls, assignment: str) -> Tuple[str, object]:
    if '=' not in assignment:
        raise VariantError(f'--set {assignment!r}: expected NAME=VALUE, e.g. --set u_weight=0.3')
    name, text = assignment.split('=', 1)
    name = name.strip()
    attributes = class_attribute_names(cls)
    if name not in attributes:
        close = difflib.get_close_matches(name, attributes, n=5, cutoff=0.5)
        hint = f' Close attribute names: {", ".join(close)}.' if close else ''
        if name in init_assigned_names(cls):
            raise VariantError(
                f'--set {name}: {cls.__name__} sets {name} in __init__, it is not a class attribute, so a variant '
                f'of class attributes cannot change it. Write the variant by hand with an __init__ that sets '
                f'self.{name} after super().__init__(...) (README, "Write your own variant").{hint}')
        raise VariantError(f'--set {name}: {cls.__name__} has no class attribute {name!r}.{hint} '
                           f'All settable attributes: {", ".join(attributes)}.')
    current = getattr(cls, name)
    value_type = type(current) if current is not None else annotated_type(cls, name)
    try:
        value = parse_value(text, value_type, allow_none=current is None or value_type is None)
    except ValueError as e:
        raise VariantError(f'--set {name}={text}: {cls.__name__}.{name} is of type {type_label(value_type)} '
                           f'(current value {current!r}); {e}.') from None
    if value_type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return name, value


# ------------------------------------------------------------------------------------------------------------------
# the file
def import_line(cls) -> str:
    return f'from {cls.__module__} import {cls.__name__}'


def variant_source(base, name: str, values: Dict[str, object], command: str) -> str:
    changes = ', '.join(f'{k} = {v!r}' for k, v in values.items())
    lines = [f'"""{name}: {base.__name__} with {changes}.', '',
             f'Written by: {command}', '"""', import_line(base), '', '',
             f'class {name}({base.__name__}):']
    lines += [f'    {k} = {v!r}' for k, v in values.items()]
    return '\n'.join(lines) + '\n'


def base_import_needs_folder(base) -> Optional[str]:
    """The ext folder a base trainer's module is importable from only during nnU-Net's search (a user's own trainer
    found through nnUNet_extTrainer), or None when it imports from anywhere."""
    import importlib.util
    module_file = _class_file(base)
    if module_file is None:
        return None
    top = base.__module__.split('.')[0]
    for entry in ext_trainer_entries():
        folder = os.path.abspath(entry)
        if os.path.commonpath([folder, os.path.abspath(module_file)]) == folder:
            if os.path.abspath(entry) == os.path.abspath(ext_trainer_folder()):
                return None  # our shim re-exports classes whose canonical module is importable
            spec = None
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                pass
            return None if spec is not None else folder
    return None


def _class_file(cls) -> Optional[str]:
    """The source file of a class. nnU-Net's ext search drops the modules it imported from sys.modules again, so
    inspect.getfile can fail; the code objects of the class's own functions still name their file."""
    module = sys.modules.get(cls.__module__)
    if getattr(module, '__file__', None):
        return module.__file__
    for value in vars(cls).values():
        function = getattr(value, '__func__', value)
        code = getattr(function, '__code__', None)
        if code is not None:
            return code.co_filename
    return None


def write_atomically(path: str, text: str) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix='.py.part', dir=folder)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_variant(base_name: str, assignments: Sequence[str], name: str, output_folder: Optional[str] = None,
                 overwrite: bool = False, command: Optional[str] = None) -> str:
    """Write the variant; returns the file path. Raises VariantError naming what is wrong and the fix."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise VariantError(f'--name {name!r} is not a valid Python class name (letters, digits and _, not starting '
                           f'with a digit), e.g. {base_name}_uw03.')
    if name == base_name:
        raise VariantError(f'--name {name} is the base trainer itself; give the variant its own name, '
                           f'e.g. {base_name}_uw03.')
    if not assignments:
        raise VariantError('Nothing to change: give at least one --set NAME=VALUE, e.g. --set u_weight=0.3.')
    base = find_trainer(base_name)
    if base is None:
        raise VariantError(f'Trainer {base_name} not found among nnU-Net\'s trainers nor in the folders of '
                           f'{ENV_VAR}={os.environ.get(ENV_VAR, "")!r}. Check the spelling, or add the folder '
                           f'holding it to {ENV_VAR}.')
    values: Dict[str, object] = {}
    for assignment in assignments:
        key, value = parse_assignment(base, assignment)
        if key in values:
            raise VariantError(f'--set {key} is given twice; keep one.')
        values[key] = value

    if output_folder is None:
        output_folder = default_output_folder()
        if output_folder is None:
            raise VariantError(f'No folder to write to: {ENV_VAR} lists no folder of yours. Pass -o DIR (the '
                               f'folder is created; then add it to {ENV_VAR}).')
    output_folder = os.path.abspath(output_folder)
    needed = base_import_needs_folder(base)
    if needed is not None and needed != output_folder:
        raise VariantError(f'{base_name} is imported from {needed} only while nnU-Net searches that folder, so '
                           f'its variant must live there too: pass -o {needed}.')
    path = os.path.join(output_folder, f'{name}.py')
    existing = find_trainer(name)
    if existing is not None:
        # nnU-Net's search imports an ext folder's file as a top-level module named after the file (and drops it
        # from sys.modules afterwards): a class from module <name> while <name>.py exists here is this very file.
        same_file = existing.__module__ == name and os.path.exists(path)
        if not same_file:
            raise VariantError(f'--name {name}: a trainer of that name already exists '
                               f'({existing.__module__}); nnU-Net would train that one. Pick another name.')
    if os.path.exists(path) and not overwrite:
        raise VariantError(f'{path} exists; pass --overwrite to replace it, or pick another --name.')
    os.makedirs(output_folder, exist_ok=True)
    if command is None:
        sets = ' '.join(f'--set {a}' for a in assignments)
        command = f'nnUNetv2_semiseg_make_variant {base_name} {sets} --name {name}'
    write_atomically(path, variant_source(base, name, values, command))
    return path


def usage_text(path: str, name: str) -> str:
    folder = os.path.dirname(path)
    listed = any(os.path.abspath(e) == folder for e in ext_trainer_entries())
    lines = [f'Wrote {path}', 'Use it:']
    if listed:
        lines.append(f'  ({folder} is already on {ENV_VAR})')
    else:
        # Our own folder is appended again at every Python start, so the user's folder alone is enough here.
        lines.append(f'  export {ENV_VAR}="{folder}"')
    lines.append(f'  nnUNetv2_train DATASET CONFIGURATION FOLD -tr {name}')
    lines.append(f'  nnUNetv2_predict ... -tr {name}    (it trains into its own folder {name}__<plans>__<config>)')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_make_variant',
        description='Write a trainer variant that changes class attributes of an existing trainer (ours or '
                    'nnU-Net\'s), as a small subclass file in a folder on nnUNet_extTrainer.')
    parser.add_argument('base', help='existing trainer class, e.g. nnUNetTrainerBCP')
    parser.add_argument('--set', dest='assignments', action='append', default=[], metavar='NAME=VALUE',
                        help='class attribute to change (repeatable), e.g. --set u_weight=0.3')
    parser.add_argument('--name', required=True, help='class name of the variant, e.g. nnUNetTrainerBCP_uw03')
    parser.add_argument('-o', '--output', default=None,
                        help=f'folder to write <name>.py to (created). Default: the first folder on {ENV_VAR}')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing <name>.py')
    args = parser.parse_args(argv)
    command = 'nnUNetv2_semiseg_make_variant ' + ' '.join(sys.argv[1:] if argv is None else argv)
    try:
        path = make_variant(args.base, args.assignments, args.name, args.output, args.overwrite, command)
    except VariantError as e:
        sys.stderr.write(f'nnUNetv2_semiseg_make_variant: error: {e}\n')
        sys.exit(2)
    print(usage_text(path, args.name))


if __name__ == '__main__':
    main()
