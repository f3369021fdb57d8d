"""Command-line options generated from config dataclasses, plus the small utilities every run shares.

Each config is a dataclass whose fields are declared with `arg(default, help, choices)`; `parse(cls, argv)`
turns `--name=value` / `--name value` into a typed instance. An unknown option, a value of the wrong type or
a value outside `choices` stops the program with one line naming the valid choices (exit code 2).
"""

import contextlib
import dataclasses
import json
import os
import sys
import typing

import torch


def arg(default, help: str, choices=None):
    """A config field with its help string (shown by --help) and, optionally, its valid values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _convert(name: str, text: str, typ):
    if typing.get_origin(typ) is typing.Union:  # Optional[X]: "none" means None
        if text.lower() == "none":
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{name}={text!r} is not a boolean; valid: true, false")
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f"--{name}={text!r} is not a valid {typ.__name__}") from None


def fail(message: str):
    """Print one error line and exit with status 2 (the convention for bad command-line input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def usage(cls, prog: str) -> str:
    lines = [f"usage: python -m minidtrpo {prog} [--option=value ...]", "", (cls.__doc__ or "").strip(), ""]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  --{f.name:<22} {hints[f.name].__name__ if hasattr(hints[f.name], '__name__') else 'value'}"
                     f" = {f.default!r}: {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def parse(cls, argv: list[str], prog: str):
    """Build a `cls` instance from command-line tokens; bad input exits with one clear line."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(usage(cls, prog))
            sys.exit(0)
        if not tok.startswith("--"):
            fail(f"unexpected argument {tok!r}; options look like --name=value (see --help)")
        name, eq, text = tok[2:].partition("=")
        name = name.replace("-", "_")
        if name not in names:
            fail(f"unknown option --{name} for '{prog}'; valid options: {', '.join('--' + n for n in names)}")
        if not eq:  # "--name value", or a bare boolean flag "--name"
            if hints[name] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                text = "true"
            elif i + 1 < len(argv):
                i, text = i + 1, argv[i + 1]
            else:
                fail(f"--{name} needs a value")
        try:
            values[name] = _convert(name, text, hints[name])
        except ValueError as e:
            fail(str(e))
        i += 1
    config = cls(**values)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            fail(f"--{f.name}={getattr(config, f.name)!r} is not valid; choose one of {', '.join(map(str, choices))}")
    return config


def parse_options(text: str) -> dict:
    """'digits=4,lsb_first=true' -> {'digits': 4, 'lsb_first': True} (ints, floats, booleans, strings)."""
    options = {}
    for item in filter(None, text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"task option {item!r} is not of the form key=value")
        for typ in (int, float):
            try:
                options[key] = typ(value)
                break
            except ValueError:
                pass
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


# ----------------------------------------------------------------------------------------------------
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
    """torch.save to a temporary file, then rename: an interruption never leaves a half-written file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: str):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (the activation memory), alive now and at peak.

        with SavedBytes() as meter:
            loss.backward()
        meter.peak  # bytes

    Works on any device: it counts what `torch.autograd.graph.saved_tensors_hooks` packs, and a tensor stops
    counting when autograd drops it (after its backward, or with its graph).
    """

    def __init__(self):
        self.alive = self.peak = 0

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda held: held.t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    def __init__(self, t, meter):
        self.t, self.meter, self.nbytes = t, meter, t.numel() * t.element_size()
        meter.alive += self.nbytes
        meter.peak = max(meter.peak, meter.alive)

    def __del__(self):
        self.meter.alive -= self.nbytes
