"""nanoGPT's configurator, with manners: config files and --key=value overrides applied to a dict of defaults.

    cfg = configure(DEFAULTS, ["config/tinystories.py", "--lr=3e-3"])

Config files are Python run with the current values in scope (they can run any code: use only your own); inside one,
include('tinystories.py') first runs another file from the same folder. Overrides are parsed with ast.literal_eval and
must match their default's type. train.py, sample.py, bench.py, data.py and model.py share this.
"""
import ast
import builtins
import difflib
import os
import re
import sys
import types

def configure(defaults: dict, argv: list[str]) -> dict:
    """Apply config files (positional) and --key=value overrides, in order, to a copy of defaults; check every key.

    Override values are parsed with ast.literal_eval (a bare word stays a string); each value must match its default's
    type (an int is accepted for a float, true/false for a bool). Unknown keys and bad types raise a one-line
    ValueError naming the key. --help prints every key with its default and comment, then exits.
    """
    if "--help" in argv or "-h" in argv:
        print(_help(defaults))
        sys.exit(0)
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if not has_value:
                raise ValueError(f"{arg}: overrides are written --key=value")
            check_known(key, defaults)
            cfg[key] = typed(key, _parse(text, defaults[key]), defaults[key])
            _echo(f"override: {key} = {cfg[key]!r}")
        else:
            changed = {}
            for key, value in _run_config_file(arg, cfg).items():
                check_known(key, defaults)
                changed[key] = cfg[key] = typed(key, value, defaults[key])
            _echo(f"config {arg}: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return cfg


def _run_config_file(path: str, cfg: dict) -> dict:
    """Execute a config file with cfg in scope; return the public plain values it added or changed."""
    namespace = dict(cfg)

    def include(name: str) -> None:  # run a base config from the same folder, e.g. include('tinystories.py')
        base = os.path.join(os.path.dirname(path), name)
        with open(base) as f:
            exec(builtins.compile(f.read(), base, "exec"), namespace)  # `compile` the key shadows the builtin

    namespace["include"] = include
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found (positional arguments are config files)")
    with open(path) as f:
        source = f.read()
    try:
        exec(builtins.compile(source, path, "exec"), namespace)
    except Exception as e:  # a user's broken config file: say where, without our traceback
        raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
    plain = {k: v for k, v in namespace.items() if not k.startswith("_") and k != "include"
             and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    return {k: v for k, v in plain.items() if k not in cfg or v != cfg[k]}


def _parse(text: str, default):
    """'3e-3' -> 0.003, '(0.9, 0.95)' -> tuple, 'True' -> True; anything else (cuda, out/x) stays the string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if default == "auto" and isinstance(value, bool):  # a tri-state key: 'auto', True or False
        return value
    return text if isinstance(default, str) and not isinstance(value, str) else value  # --out_dir=2024 is a name


def typed(key: str, value, default):
    """value converted to default's type where that is lossless, else a ValueError naming key and the expected type."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        ok = isinstance(value, bool)
    elif default == "auto" and isinstance(value, bool):  # e.g. compile: 'auto', True or False (the script checks)
        return value
    elif isinstance(default, (int, float)):
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if is_number and isinstance(default, float):
            return float(value)
        ok = is_number and float(value).is_integer()  # --max_iters=1e4 is an int
        value = int(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and (not default or len(value) > 0)
        if ok and default:
            return tuple(typed(key, v, default[min(i, len(default) - 1)]) for i, v in enumerate(value))
        value = tuple(value) if ok else value
    elif default is None:
        ok = value is None or isinstance(value, (int, float, str)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = "int/float/str or None" if default is None else type(default).__name__
        raise ValueError(f"{key}={value!r} has the wrong type: expected {expected} (default {default!r})")
    return value


def check_known(key: str, defaults: dict) -> None:
    if key not in defaults:
        nearest = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.0)
        hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
        raise ValueError(f"unknown config key '{key}'{hint} (--help lists them all)")


def _help(defaults: dict) -> str:
    """Keys, defaults and the trailing comments of their definitions in the running script and in train.py."""
    comments = {}
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")  # its defaults, commented
    for path in dict.fromkeys([os.path.abspath(sys.argv[0]), train_py]):  # the script's own first
        if os.path.isfile(path):
            with open(path) as f:
                for m in re.finditer(r'^\s*"?(\w+)"?\s*[=:]\s*.*?\s+# (.*)$', f.read(), re.M):
                    comments.setdefault(m[1], m[2])
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [config/FILE.py ...] [--key=value ...]"]
    lines += [f"  --{k}={v!r}".ljust(44) + f"  {comments.get(k, '')}" for k, v in defaults.items()]
    return "\n".join(lines)


def _echo(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(message)


def run_cli(main) -> None:  # TEMPORARY stand-in until the robustness branch lands
    try:
        code = main(sys.argv[1:])
    except (ValueError, OSError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
