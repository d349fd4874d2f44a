"""
The configurator: settings come from module-level defaults, then config files, then --key=value.

    python train.py config/deepseek_moe.py --batch_size=32 --compile=False

A config file is plain Python assignments, run with the current settings visible (so a file can
write `expert_hidden = n_embd // 2`). Every key must be a known setting and keep its default's type
(an int is accepted for a float); anything else raises ValueError with a one-line message naming the
key and the fix. This is the only place that reads the command line's settings.
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
    if type(value) is not want:                         # bool is an int subclass: require the real type
        raise ValueError(f"setting {key!r} expects {want.__name__} (like {defaults[key]!r}), "
                         f"got {type(value).__name__} {value!r}")
    return value


def parse_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, 'out-moe' -> 'out-moe' (anything not a literal is a string)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def configure(defaults: dict, argv: list[str]) -> dict:
    """Apply config files and --key=value overrides, in order, to a copy of defaults."""
    settings = dict(defaults)
    for arg in argv:
        if arg.startswith('--'):
            key, eq, text = arg[2:].partition('=')
            if not eq:
                raise ValueError(f"argument {arg!r} has no value; write --{key}=VALUE")
            settings[key] = check_value(key, parse_value(text), defaults)
            continue
        if not os.path.isfile(arg):
            raise ValueError(f"config file {arg} not found; pass a path like config/deepseek_moe.py")
        namespace = dict(settings)
        with open(arg) as f:
            code = compile(f.read(), arg, 'exec')
        exec(code, namespace)
        for key, value in namespace.items():
            if key.startswith('_') or isinstance(value, types.ModuleType):
                continue                                # __builtins__, imports, private helpers
            try:
                settings[key] = check_value(key, value, defaults)
            except ValueError as e:
                raise ValueError(f"{arg}: {e}") from None
    return settings
