"""
Settings for scripts, nanoGPT style. A script keeps its settings as module-level globals, each with a comment
saying what it means, and calls

    overridden = configure(globals(), sys.argv[1:], script=__file__)

Each argument is a config file (`config/lora_gsm8k.py`: plain Python assigning some of the globals) or
`--key=value` (also `--key value`), applied in order. A value is read as a Python literal (`--lr=3e-4`,
`--lora_targets=('q_proj','v_proj')`, `true`/`false` for a flag), else taken as a string (`--dataset=alpaca`).
Every key must already exist and the new value must have the default's type (an int is accepted for a float, a
comma-separated string for a tuple); anything else stops the script with one line naming the key, the value and
what was expected. `--help` lists every setting with its default and its comment.
"""
import argparse
import ast
import difflib
import re
import sys


def fail(msg):
    raise SystemExit(f"config error: {msg}")  # exit status 1, the message on stderr, no traceback


def settings(config):
    """The settings among a script's globals: lower-case names of plain values (constants are upper case)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and not k.isupper()
            and (v is None or isinstance(v, (int, float, bool, str, tuple)))}


def checked(config, key, value, where):
    """value converted to the type of config[key], or a clear exit."""
    if key not in config:
        near = difflib.get_close_matches(key, config, n=1)
        fail(f"{where}: unknown key {key!r} (value {value!r})" + (f"; did you mean {near[0]!r}?" if near else "")
             + " (--help lists the settings)")
    default = config[key]
    expected = type(default)
    if expected is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if default is None or isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    if expected is float and type(value) is int:
        return float(value)
    if expected is tuple and isinstance(value, (list, str)):
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
    fail(f"{where}: {key}={value!r} has type {type(value).__name__}, expected type {expected.__name__} "
         f"(like --{key}={default!r})")


def configure(config, argv, script=None, renamed=None):
    """Apply config files and --key=value arguments to the dict `config` (a script's globals()), checking keys
    and types against the defaults; --help prints the settings of `script`. Returns the keys that were set."""
    defaults, overridden, renamed = settings(config), set(), renamed or {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print_help(defaults, script)
            raise SystemExit(0)
        if not arg.startswith("--"):
            items, where = config_file(arg), arg
        else:
            key, _, text = arg[2:].partition("=")
            if not _ and (not args or args[0].startswith("--")):
                fail(f"argument {arg!r} needs a value: --{key}=VALUE")
            text = text if _ else args.pop(0)
            if key in renamed:
                fail(f"--{key} is now --{renamed[key]}")
            items, where = [(key, literal(text, defaults.get(key)))], "command line"
        for key, value in items:
            if isinstance(value, type(sys)):  # `import math` in a config file is not a setting
                continue
            value = checked(defaults, key, value, where)
            print(f"overriding: {key} = {value!r}")
            config[key] = defaults[key] = value
            overridden.add(key)
    return overridden


def literal(text, default):
    """A command-line value as a Python literal, or the text itself (a string setting always stays text)."""
    if isinstance(default, str):
        return text  # --out_dir=2024 is the folder "2024"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --dataset=alpaca


def config_file(path):
    try:
        source = open(path).read()
    except OSError as e:
        fail(f"cannot read config file {path!r} ({e.strerror}); arguments are config files or --key=value")
    print(f"overriding config with {path}:\n{source}")
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        fail(f"{path}, line {e.lineno}: {e.msg}")
    scope = {}
    exec(code, scope)
    return [(k, v) for k, v in scope.items() if not k.startswith("_")]


def print_help(defaults, script):
    """Every setting with its default and the comment beside it in the script's settings block."""
    source = open(script).read() if script else ""
    doc = ast.get_docstring(ast.parse(source)) if source else None
    print((doc or "").strip() + "\n\nsettings (config files and --key=value override them, in order):")
    for key, value in defaults.items():
        found = re.search(rf"^{key} = .*?(?:# (.*))?$", source, re.M)
        print(f"  --{key}={value!r}".ljust(39), (found and found[1]) or "")


def check(config, at_least_one=(), choices=None):
    """Settings that would fail deep inside a run are refused at its start, with what was expected."""
    for key in at_least_one:
        if config[key] < 1:
            fail(f"{key}={config[key]!r}, expected at least 1")
    for key, allowed in (choices or {}).items():
        if config[key] not in allowed:
            fail(f"{key}={config[key]!r}, expected {' or '.join(map(repr, allowed))}")


def renamed(parser, names):
    """Refuse the old spellings {old: new} of a script's options with a pointer to the new one."""
    for old, new in names.items():
        parser.add_argument(old, nargs="?", help=argparse.SUPPRESS, action=_Renamed, default=argparse.SUPPRESS,
                            const=new)


class _Renamed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.const}")
