"""nanoGPT's configurator, with manners: config files and --key=value overrides applied to a dict of defaults.

    cfg = configure(DEFAULTS, ["config/tinystories.py", "--lr=3e-3"])

Config files are Python run with the current values in scope (they can run any code: use only your own); inside one,
include('tinystories.py') first runs another file from the same folder. Overrides are parsed with ast.literal_eval and
must match their default's type. train.py, sample.py, bench.py, data.py and model.py share this, and run_cli, which
turns the errors a user can cause into one line and an exit code.
"""
import ast
import builtins
import difflib
import math
import os
import re
import sys
import types
from collections.abc import Callable
from typing import NoReturn, TextIO

_INT_LIMIT = 2**63 - 1  # torch's int64: a larger int overflows deep inside torch (OverflowError, not our message)
_NON_FINITE = ("nan", "inf", "infinity")  # what float() reads but ast.literal_eval does not
# Names users bring from nanoGPT and Hugging Face, and the key meant; None: no such setting here.
_ALIASES = {"learning_rate": "lr", "iters": "max_iters", "batch": "batch_size", "n_layer": "num_layers",
            "n_head": "num_heads", "n_embd": "d_model", "block_size": "context_length", "dropout": None,
            "gradient_accumulation_steps": "grad_accum_steps", "lr_decay_iters": "cosine_iters",
            "eval_iters": "eval_tokens"}  # nanoGPT's names, and eval_iters of train.py before eval_tokens

def configure(defaults: dict, argv: list[str], echo: TextIO | None = None) -> dict:
    """defaults with the config files (positional) and --key=value overrides of argv applied, in order."""
    return defaults | overrides(defaults, argv, echo)


def overrides(defaults: dict, argv: list[str], echo: TextIO | None = None) -> dict:
    """The values argv sets: config files (positional) and --key=value overrides, applied in order; check every key.

    Override values are parsed with ast.literal_eval (a bare word stays a string); each value must match its default's
    type (an int is accepted for a float, true/false for a bool). Unknown keys and bad types raise a one-line
    ValueError naming the key. --help prints every key with its default and comment, then exits. A key a config file
    assigns counts as set even when it keeps the default's value: train.py refuses it if it contradicts init_from.
    Each file and override is echoed to echo (None: stdout; sample.py keeps its stdout for the samples).
    """
    if "--help" in argv or "-h" in argv:
        print(_help(defaults))
        sys.exit(0)
    cfg, given = dict(defaults), {}
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if not has_value:
                raise ValueError(f"{arg}: overrides are written --key=value")
            check_known(key, defaults)
            given[key] = cfg[key] = typed(key, _parse(text, defaults[key]), defaults[key])
            _echo(f"override: {key} = {cfg[key]!r}", echo)
        else:
            changed = {}
            for key, value in _run_config_file(arg, cfg).items():
                check_known(key, defaults)
                given[key] = changed[key] = cfg[key] = typed(key, value, defaults[key])
            _echo(f"config {arg}: " + ", ".join(f"{k}={v!r}" for k, v in changed.items()), echo)
    return given


def _assigned(path: str, source: str) -> set[str]:
    """The names a config file assigns anywhere (x = ..., x += ..., for x in ...), found in its syntax tree."""
    try:
        tree = ast.parse(source, path)
    except SyntaxError:
        return set()  # exec reports it, with the file and line
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def _run_config_file(path: str, cfg: dict) -> dict:
    """Execute a config file with cfg in scope; return the public plain values it (or a file it includes) assigns or
    changes."""
    namespace, assigned = dict(cfg), set()

    def run(file: str) -> None:
        with open(file, encoding="utf-8") as f:
            source = f.read()
        assigned.update(_assigned(file, source))
        exec(builtins.compile(source, file, "exec"), namespace)  # `compile` the key shadows the builtin

    namespace["include"] = lambda name: run(os.path.join(os.path.dirname(path), name))  # e.g. include('demo.py')
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "not found"
        raise FileNotFoundError(f"config file {path} {problem} (positional arguments are config files; "
                                "overrides are written --key=value)")
    try:
        run(path)
    except Exception as e:  # a user's broken config file: say where, without our traceback
        raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
    plain = {k: v for k, v in namespace.items() if not k.startswith("_") and k != "include"
             and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    return {k: v for k, v in plain.items() if k in assigned or k not in cfg or v != cfg[k]}


def _parse(text: str, default):
    """'3e-3' -> 0.003, '(0.9, 0.95)' -> tuple, 'True' -> True; anything else (cuda, out/x) stays the string."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = float(text) if text.strip().lower().lstrip("+-") in _NON_FINITE else text  # typed refuses it by name
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
        if is_number:
            _check_number(key, value)
        if is_number and isinstance(default, float):
            return float(value)
        ok = is_number and float(value).is_integer()  # --max_iters=1e4 is an int
        if ok:
            _check_number(key, value := int(value))  # --max_iters=1e30 is not
    elif isinstance(default, tuple):
        ok = isinstance(value, (tuple, list)) and (not default or len(value) > 0)
        if ok and default:
            return tuple(typed(key, v, default[min(i, len(default) - 1)]) for i, v in enumerate(value))
        value = tuple(value) if ok else value
    elif default is None:
        ok = value is None or isinstance(value, (int, float, str)) and not isinstance(value, bool)
        if ok and isinstance(value, (int, float)):
            _check_number(key, value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        expected = "int/float/str or None" if default is None else type(default).__name__
        raise ValueError(f"{key}={value!r} has the wrong type: expected {expected} (default {default!r})")
    return value


def _check_number(key: str, value: int | float) -> None:
    """Refuse nan and inf (no key means them) and ints beyond int64, naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value} is not allowed; use a finite number")
    if isinstance(value, int) and abs(value) > _INT_LIMIT:
        raise ValueError(f"{key}={value:.4g} is too large to mean anything here (at most 2**63 - 1)")


def check_known(key: str, defaults: dict) -> None:
    """A one-line ValueError for a key that is not in defaults, with a suggestion only when one is really near."""
    if key not in defaults:
        raise ValueError(f"unknown config key '{key}'{_hint(key, list(defaults))} (--help lists them all)")


def _hint(key: str, keys: list[str]) -> str:
    """'; did you mean ...?' from the alias table, keys that start with the word or hold its words in another
    order (lr_min -> min_lr), or a close spelling (ratio >= 0.75: below it 'leraning_rate' meets 'train_data')."""
    word = key.lower().replace("-", "_")
    if word in _ALIASES and _ALIASES[word] is None:
        return f": this model has no {word}"
    near = [k for k in keys if k == _ALIASES.get(word)]
    near = near or [k for k in keys if len(word) >= 3 and k.startswith(word)
                    or sorted(k.split("_")) == sorted(word.split("_"))]
    near = near or difflib.get_close_matches(word, keys, n=1, cutoff=0.75)
    return "; did you mean " + " or ".join(f"'{k}'" for k in near[:3]) + "?" if near else ""


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


def _echo(message: str, file: TextIO | None) -> None:
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
        print(message, file=file)


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone (a closed pipe), and what is still printed goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_cli(main: Callable[[list[str]], int | None]) -> NoReturn:
    """Run main(sys.argv[1:]) as a command and exit with its return value (None = 0). An error a user can cause
    (ValueError, OSError, out of memory) prints `error: <message>` and exits 2; Ctrl-C prints `interrupted` (with
    the KeyboardInterrupt's text, if any) and exits 130; neither shows a traceback, other exceptions (bugs) do.
    Under torchrun (RANK set) every rank meets the same bad key or file, so only rank 0 prints; another rank prints
    `error (rank N): ...` only when it ran out of memory, which is its own device's failure."""
    rank = int(os.environ.get("RANK") or 0)
    try:
        code = main(sys.argv[1:])
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not as a traceback at exit
    except KeyboardInterrupt as e:
        if rank == 0:
            print("interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `python sample.py | head`: the reader left, nothing to report
        silence_stdout()  # no second error when Python flushes stdout
        sys.exit(1)
    except Exception as e:
        out_of_memory = isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)
        if not (out_of_memory or isinstance(e, (ValueError, OSError))):
            raise
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch's OOM text runs on for lines
        message = ("out of memory: " if out_of_memory else "") + first_line
        if rank == 0 or out_of_memory:
            print(f"error (rank {rank}): {message}" if rank else f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
