"""Command-line options made with argparse from config dataclasses; device, precision, file writes.

Each config is a dataclass whose fields are declared with `arg(default, help, choices)`.
`parse(cls, argv)` makes one argparse option per field (`--name=value` or `--name value`; a bare
boolean flag means true), then builds the dataclass, whose `__post_init__` checks the rules between
fields. Every bad input (an unknown option, a value of the wrong type or outside `choices`, a broken
rule) stops the program before any work with one line naming the option, the value and what is
valid (exit code 2).
"""

import argparse
import contextlib
import dataclasses
import json
import math
import operator
import os
import re
import sys
import typing

import torch


def arg(default, help: str, choices=None, *, ge=None, gt=None, le=None, lt=None, valid=None,
        group=None):
    """A config field: its default, help string (shown by --help) and what values it accepts:
    `choices`, bounds (ge ≥, gt >, le ≤, lt <), or `valid(value)` -> None, or what is valid.
    group: the --help section it is listed in (None: the core options, listed first)."""
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices,
                                                        "bounds": bounds, "valid": valid,
                                                        "group": group})


def device_arg():
    """The --device option every command shares."""
    return arg("auto", "auto | cpu | cuda | cuda:N | mps", valid=device_problem)


class BadInput(Exception):
    """Input found bad once a command has started (a missing or damaged file, a run folder that
    belongs to another run): the command line prints its message as one line and exits with 2."""


class RunStopped(Exception):
    """A run that stopped itself (non-finite training): one line, exit code 3."""


def read_saved(path: str, what: str, keys: tuple, device="cpu") -> dict:
    """torch.load(path, weights_only=True), checked: a missing, empty, damaged or wrong-kind file
    raises BadInput with one line naming the path and what was expected."""
    kinds = {"model": "a checkpoint", "chosen": "a pairs file"}  # a key each kind always holds
    if not path:
        raise BadInput(f"an empty path where {what} was expected")
    if not os.path.isfile(path):
        raise BadInput(f"{path}: {'a directory' if os.path.isdir(path) else 'no such file'}; "
                       f"expected {what}")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{path}: an empty file; expected {what}")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, random bytes, pickled code: all unreadable as weights
        raise BadInput(f"{path}: unreadable ({type(e).__name__}); expected {what}") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        found = next((kind for key, kind in kinds.items() if isinstance(obj, dict) and key in obj),
                     "some other file")
        raise BadInput(f"{path}: {found} (no {missing[0]!r}); expected {what}")
    return obj


def fail(message: str):
    """Print one error line and exit with status 2 (the convention for bad command-line input).
    Under torchrun every process finds the same error; rank 0 alone prints it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def exit_on_bad_input(main, *args):
    """Call main(*args); a BadInput found once it started (a missing or damaged file, say) is one
    line on stderr and exit code 2, as bad options are."""
    try:
        return main(*args)
    except BadInput as e:
        fail(str(e))


def check(ok: bool, name: str, value, valid: str):
    """A config rule: raise ValueError naming the option, its value and what is valid unless ok."""
    if not ok:
        raise ValueError(f"--{name}={value!r} is not valid; valid: {valid}")


_OPS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le),
        "lt": ("<", operator.lt)}


@dataclasses.dataclass
class Config:
    """Base of every options dataclass: each field is checked against what its `arg` declares,
    whether the config comes from the command line or from Python. Subclasses add the rules
    between fields in their own __post_init__ (calling this one first)."""

    @classmethod
    def defaults(cls, given: dict) -> dict:
        """Defaults that depend on other options given on the command line: none here."""
        return {}

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, meta, typ = getattr(self, f.name), f.metadata, hints[f.name]
            if not isinstance(value, typ) and not (typ is float and type(value) is int):
                raise ValueError(f"--{f.name}={value!r} is not valid; valid: a {typ.__name__}")
            if typ is float and not math.isfinite(value):  # inf would pass every bound
                raise ValueError(f"--{f.name}={value!r} is not valid; valid: a finite number")
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"--{f.name}={value!r} is not valid; choose one of "
                                 f"{', '.join(map(str, meta['choices']))}")
            bounds = meta.get("bounds", {})
            check(all(_OPS[k][1](value, v) for k, v in bounds.items()), f.name, value,
                  _bounds_text(f))
            problem = meta["valid"](value) if meta.get("valid") else None
            check(problem is None, f.name, value, problem)


def _bounds_text(f) -> str:
    """'an int >= 1', 'a number > 0 and <= 1': what a field's bounds allow (messages, --help)."""
    kind = "an int" if type(f.default) is int else "a number"
    bounds = f.metadata.get("bounds", {})
    return f"{kind} " + " and ".join(f"{_OPS[k][0]} {v if type(v) is int else format(v, 'g')}"
                                    for k, v in bounds.items())


def path_problem(path: str):
    """None if a run may write `path` (a file or a folder of files): not empty, not an existing
    file where a folder is wanted or vice versa is checked by the caller; its nearest existing
    ancestor must be a writable folder. Else what is valid."""
    if not path:
        return "a path (not empty)"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"a path under a writable folder ({parent} is not one)"
    return None


def folder_problem(path: str):
    """`valid=` of an output folder: writable, and not an existing file."""
    return "a folder, not an existing file" if os.path.isfile(path) else path_problem(path)


def file_problem(path: str):
    """`valid=` of an output file: writable, and not an existing folder."""
    return "a file, not an existing folder" if os.path.isdir(path) else path_problem(path)


def device_problem(name: str):
    """None if this machine has device `name` (auto, cpu, cuda, cuda:N, mps), else what it has."""
    have = ["auto", "cpu"] + (["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
                              if torch.cuda.is_available() else [])
    have += ["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() \
        else []
    return None if name in have else f"{', '.join(have)} (the devices this machine has)"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message over several lines; we print one
        fail(re.sub(r"^argument [-\w]+: (?=--)", "", message))  # ours name the option themselves


def _converter(name: str, typ):
    """argparse `type=` for one field: text -> a value of the field's type (checks come later)."""
    def convert(text: str):
        if typ is bool:
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise argparse.ArgumentTypeError(
                    f"--{name}={text!r} is not a boolean; valid: true, false")
            return text.lower() in ("1", "true", "yes")
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name}={text!r} is not a valid {typ.__name__}") from None
    return convert


def build_parser(cls, prog: str) -> argparse.ArgumentParser:
    """One argparse option per dataclass field, with its type, default, help and choices; the core
    options first, then each `group` of research options in the order its first field appears."""
    parser = _Parser(prog=prog, description=(cls.__doc__ or "").strip(),
                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    groups = {None: parser.add_argument_group("core options")}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("group")
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        choices = f.metadata.get("choices")
        extra = f"; one of {', '.join(map(str, choices))}" if choices else ""
        extra += f"; {_bounds_text(f)}" if f.metadata.get("bounds") else ""
        groups[name].add_argument(f"--{f.name}", type=_converter(f.name, hints[f.name]),
                                  default=argparse.SUPPRESS,  # absent from the result unless given
                                  metavar=hints[f.name].__name__.upper(),
                                  nargs="?" if hints[f.name] is bool else None,
                                  const=True if hints[f.name] is bool else None,  # bare: true
                                  help=f"{f.metadata.get('help', '')} "
                                       f"(default {f.default!r}{extra})")
    return parser


def parse(cls, argv: list[str], prog: str):
    """Build a `cls` instance from command-line tokens; bad input exits with one clear line.
    An option not given takes its default: the field's, or the one `cls.defaults(given)` sets from
    the options given (sft: the task's recipe)."""
    parser = build_parser(cls, prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=")[0]
        valid = ", ".join(f"--{f.name}" for f in dataclasses.fields(cls))
        fail(f"unknown option {name} for '{prog}'; valid options: {valid}")
    given = vars(args)
    try:
        return cls(**{**cls.defaults(given), **given})
    except ValueError as e:  # a rule of __post_init__
        fail(str(e))


def parse_options(text: str) -> dict:
    """'digits=4,lsb_first=true' -> {'digits': 4, 'lsb_first': True} (int, float, bool or str)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"option {item!r} is not of the form key=value")
        for typ in (int, float):
            try:
                options[key] = typ(value)
                break
            except ValueError:
                pass
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


# --------------------------------------------------------------------------------------------------
# Device, precision, files


def pick_device(name: str = "auto", verbose: bool = True) -> torch.device:
    """'auto' picks cuda, then mps, then cpu, and says which."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
        if verbose:
            print(f"device: {name} (auto)")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_save(obj, path: str):
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # unique per process: no two writers share a temporary file
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path: str):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
