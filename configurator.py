"""
The configurator: settings come from module-level defaults, then config files, then --key=value.

    python train.py config/deepseek_moe.py --batch_size=32 --compile=False

A config file is plain Python assignments, run in order with the current settings visible, so a file can
derive one setting from another (`expert_hidden = n_embd // 2`).

The command line always wins, everywhere: a setting given as --key=value holds that value from the start,
in every config file (an assignment to it there is ignored), and at the end. So
`config/deepseek_moe.py --n_embd=192` builds experts 192 // 2 = 96 wide, as the file intends, not
384 // 2 = 192. Where several --key=value name the same key, the last one counts.

Every key must be a known setting and keep its default's type (an int is accepted for a float; a setting
whose default is 'auto' also takes True or False); anything else raises ValueError with a one-line message
naming the key and the fix. This is the only place that reads the command line's settings.
"""

import ast
import difflib
import os
import types


def check_value(key: str, value, defaults: dict):
    """Return value converted to the type of defaults[key], or raise ValueError naming the problem."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults.keys(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see the settings at the top of the script"
        raise ValueError(f"unknown setting {key!r}{hint}")
    want = type(defaults[key])
    if want is float and type(value) is int:            # 3 for 3.0 is fine
        return float(value)
    if defaults[key] == 'auto' and type(value) is bool:  # compile='auto' | True | False
        return value
    if type(value) is not want:                         # bool is an int subclass: require the real type
        also = ' or bool' if defaults[key] == 'auto' else ''
        raise ValueError(f"setting {key!r} expects {want.__name__} (like {defaults[key]!r}){also}, "
                         f"got {type(value).__name__} {value!r}")
    return value


def parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, 'out-moe' -> 'out-moe' (anything not a literal is a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class ConfigNamespace(dict):
    """The namespace a config file runs in: the settings so far, where an assignment to a setting given on
    the command line is ignored, so that the rest of the file computes with the command-line value."""

    def __init__(self, settings: dict, pinned: dict):
        super().__init__(settings)
        self.pinned = pinned

    def __setitem__(self, key, value):
        if key not in self.pinned:
            super().__setitem__(key, value)


def config_files(argv: list[str]) -> list[str]:
    """The config files among the arguments, in order (recorded in metrics.jsonl)."""
    return [arg for arg in argv if not arg.startswith('--')]


def configure(defaults: dict, argv: list[str], base: dict | None = None) -> dict:
    """Apply config files and --key=value settings to a copy of base (default: defaults). See the module
    docstring for the rule: the command line holds from the start, through every file, to the end."""
    pinned, files = {}, []
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ValueError(f"argument {arg!r} has no value; write --{key}=VALUE")
            pinned[key] = check_value(key, parse_value(text), defaults)
        elif not os.path.isfile(arg):
            raise ValueError(f"config file {arg} not found; pass a path like config/deepseek_moe.py")
        else:
            files.append(arg)
    settings = {**(defaults if base is None else base), **pinned}
    for path in files:
        with open(path) as f:
            code = compile(f.read(), path, 'exec')
        namespace = ConfigNamespace(settings, pinned)
        exec(code, namespace)      # one namespace: comprehensions and lambdas see the file's own assignments
        for key, value in namespace.items():
            if key.startswith('_') or isinstance(value, types.ModuleType):
                continue                                # __builtins__, imports, private helpers
            try:
                settings[key] = check_value(key, value, defaults)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
    return settings
