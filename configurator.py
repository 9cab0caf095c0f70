"""
Config overrides for scripts, nanoGPT style. A script keeps its settings as module-level globals and calls

    overridden = configure(globals(), sys.argv[1:])

Each argument is either a config file (`config/lora_gsm8k.py`: plain Python assigning some of the globals)
or `--key=value`, applied in order. A value is read as a Python literal (`--lr=3e-4`, `--lora_targets=
('q_proj','v_proj')`), else taken as a string (`--dataset=alpaca`). Every key must already exist and the new
value must have the default's type (an int is accepted for a float; a comma-separated string for a tuple);
anything else stops the script with a message naming the key, the value and the expected type.
"""
import argparse
import ast
import sys


def fail(msg):
    raise SystemExit(f"config error: {msg}")  # exit status 1, the message on stderr, no traceback


def checked(config, key, value, where):
    """value converted to the type of config[key], or a clear exit."""
    if key not in config:
        fail(f"{where}: unknown key {key!r} (value {value!r}); known keys: {', '.join(sorted(config))}")
    default = config[key]
    expected = type(default)
    if default is None or isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    if expected is float and type(value) is int:
        return float(value)
    if expected is tuple and isinstance(value, (list, str)):
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
    fail(f"{where}: {key}={value!r} has type {type(value).__name__}, expected type {expected.__name__} "
         f"(like {default!r})")


def configure(config, argv):
    """Apply config files and --key=value arguments to the dict `config` (a script's globals()), checking
    keys and types against the defaults. Returns the set of keys that were set."""
    defaults = {k: v for k, v in config.items()  # constants (upper case) are not settings
                if not k.startswith("_") and not k.isupper()
                and (v is None or isinstance(v, (int, float, bool, str, tuple)))}
    overridden = set()
    for arg in argv:
        if not arg.startswith("--"):
            try:
                source = open(arg).read()
            except OSError as e:
                fail(f"cannot read config file {arg!r} ({e.strerror}); arguments are config files or --key=value")
            print(f"overriding config with {arg}:\n{source}")
            scope = {}
            try:
                code = compile(source, arg, "exec")
            except SyntaxError as e:
                fail(f"{arg}, line {e.lineno}: {e.msg}")
            exec(code, scope)
            items = [(k, v) for k, v in scope.items() if not k.startswith("_")]
            where = arg
        else:
            if "=" not in arg:
                fail(f"argument {arg!r} must look like --key=value")
            key, text = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as --dataset=alpaca
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # --out_dir=2024 is the folder "2024"
            items, where = [(key, value)], "command line"
        for key, value in items:
            if isinstance(value, type(sys)):  # `import math` in a config file is not a setting
                continue
            value = checked(defaults, key, value, where)
            print(f"overriding: {key} = {value!r}")
            config[key] = defaults[key] = value
            overridden.add(key)
    return overridden


def renamed(parser, names):
    """Refuse the old spellings {old: new} of a script's options with a pointer to the new one."""
    for old, new in names.items():
        parser.add_argument(old, nargs="?", help=argparse.SUPPRESS, action=_Renamed, default=argparse.SUPPRESS,
                            const=new)


class _Renamed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.const}")
