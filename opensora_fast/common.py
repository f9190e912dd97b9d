"""What the programs (``train``, ``sample``, ``demo``, ``train-vae``, ``extract``, ``eval-loss``) share, below all
of them: the usage error the CLI prints without a traceback, local-path and device checks, the VAE / STDiT3
weight files, and options declared once as dataclass fields from which the command-line flags are derived.

``option(default, help, ...)`` is a ``dataclasses.field`` that also carries the flag's help text (and, where the
flag differs from ``--field-name``, its name, choices, parser, metavar, ``--help`` section). ``add_options(parser,
Cls)`` adds one flag per such field with the field's default (shown by ``--help``); ``options_from(Cls,
namespace)`` builds the dataclass back from parsed arguments. Fields without help text are not command-line
options; ``add_options(parser, Cls, expose={field: option_meta(help, ...)})`` makes flags of chosen fields of a
dataclass declared without ``option``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import torch


class UsageError(ValueError):
    """A bad or missing command-line value; the CLI prints it without a traceback."""


def require_path(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise UsageError(f"{flag} is required: the local path of {what} (opensora-fast never downloads weights)")
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r} does not exist; give the local path of {what} (no downloads)")
    return path


def check_device(device: str | None, flag: str = "--device") -> None:
    """UsageError for a device string that is not cpu / cuda[:N], or cuda on a machine without a GPU."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: no CUDA GPU is available to this PyTorch; use {flag} cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s)")


# ---------------------------------------------------------------------------------------------
# weights


def load_vae(path: str, device=None, dtype=None):
    """OpenSoraVAE from a local file or directory (architecture from the config.json that
    save_pretrained wrote, else the release's), in eval mode without gradients."""
    from opensora_fast.models.vae import OpenSoraVAE

    return OpenSoraVAE.from_pretrained(path, device=device, dtype=dtype).eval().requires_grad_(False)


def stdit3_config_dict(config) -> dict:
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
    return json.loads(json.dumps({**config.extra, **d}))


def save_stdit3(state_dict: dict, config, path: str) -> str:
    """``model.safetensors`` + ``config.json`` in directory ``path`` (STDiT3.from_pretrained reads both)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    dst = os.path.join(path, "model.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump(stdit3_config_dict(config), f, indent=1)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))
    return path


# ---------------------------------------------------------------------------------------------
# options: dataclass fields -> command-line flags


def option(
    default: Any = None,
    help: str = "",  # noqa: A002 (argparse's name)
    *,
    default_factory: Any = None,
    **meta,
):
    """A dataclass field that is also a command-line flag (``--field-name`` unless ``flag`` names it). ``meta``
    as ``option_meta``: ``flag``, ``choices``, ``metavar``, ``required``; ``parse``: the argparse ``type``
    (default: the default's type; a ValueError it raises is shown as the message); a bool field with default
    False is a switch, one with default True is turned off by its ``--no-...`` ``flag``; ``group``: the title
    of the ``--help`` section the flag is listed in (one section per title); other keywords (``nargs``,
    ``action``, ``const``) go to ``add_argument``."""
    cli = option_meta(help, **meta)
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"cli": cli})
    return dataclasses.field(default=default, metadata={"cli": cli})


def option_meta(
    help: str,  # noqa: A002 (argparse's name)
    *,
    flag: str | None = None,
    choices: tuple | None = None,
    parse: Any = None,
    metavar: str | None = None,
    required: bool = False,
    group: str | None = None,
    **argparse_kw,
) -> dict:
    """What ``option`` records about a flag, without the field: for ``add_options(..., expose=...)``, the flags of
    a dataclass whose fields are not ``option``s."""
    return {"help": help, "flag": flag, "choices": choices, "parse": parse, "metavar": metavar,
            "required": required, "group": group, "kw": argparse_kw}  # fmt: skip


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def flag_of(f: dataclasses.Field, meta: dict | None = None) -> str:
    meta = f.metadata["cli"] if meta is None else meta
    return meta["flag"] or "--" + f.name.replace("_", "-")


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(
    parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), expose: dict[str, dict] | None = None
) -> None:
    """One flag per ``option`` field of dataclass ``cls`` (not in ``skip``), its default the field's.
    ``expose``: field name -> ``option_meta(...)``, in the order the flags are added, for the fields of a
    dataclass that has no ``option`` fields (its defaults are still the flags' defaults)."""
    if expose is None:
        fields = [(f, f.metadata["cli"]) for f in cli_fields(cls)]
    else:
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(expose) - set(by_name)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        fields = [(by_name[name], m) for name, m in expose.items()]
    for f, m in fields:
        if f.name in skip:
            continue
        default = _default_of(f)
        kw: dict[str, Any] = {"dest": f.name, "help": m["help"]}
        if m["required"]:
            kw["required"] = True
        if default is False and m["parse"] is None:
            kw["action"] = "store_true"
            kw["default"] = False
        elif default is True and m["parse"] is None:  # on by default: only its --no-X flag exists
            if not flag_of(f, m).startswith("--no-"):
                raise ValueError(f"option {f.name}: a bool that defaults to True needs a --no-... flag")
            kw["action"] = "store_false"
            kw["default"] = True
        else:
            kw["default"] = default
            parse = m["parse"]
            if parse is None and default is not None and not isinstance(default, (str, dict, list, tuple)):
                parse = type(default)
            if parse is not None:
                kw["type"] = _arg_type(parse)
            if m["choices"] is not None:
                kw["choices"] = m["choices"]
            if m["metavar"] is not None:
                kw["metavar"] = m["metavar"]
        kw.update(m["kw"])
        _group(parser, m.get("group")).add_argument(flag_of(f, m), **kw)


def _group(parser: argparse.ArgumentParser, title: str | None):
    """``parser`` itself, or its argument group titled ``title`` (made on first use)."""
    if title is None:
        return parser
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def _arg_type(fn):
    """``fn`` for argparse: a ValueError's message is shown as it is (not "invalid fn value")."""
    if fn in (int, float, str):
        return fn

    def parse(text: str):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(fn, "__name__", "value")
    return parse


def options_from(cls, namespace, **overrides):
    """``cls`` built from the parsed arguments that are its fields (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kw = {k: v for k, v in vars(namespace).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def tensorboard_writer(log_dir: str):
    """A ``torch.utils.tensorboard.SummaryWriter`` into ``log_dir`` when tensorboard is installed (the optional
    ``tensorboard`` extra), else None: event files beside ``log.jsonl``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def apply_resume_options(args, run: dict, path: str, *, skip=(), fixed=(), renamed=None, flag=None,
                         extend=("steps",)) -> None:  # fmt: skip
    """Take a run's options from its checkpoint's ``run.json`` (``run``) onto ``args``: an option not given on
    this command line (``args.explicit``) gets the run's value; one given that differs is kept with a warning,
    except those in ``fixed`` (the weights decide them: UsageError, one line). ``skip``: options that are not
    the run's (output directory, device, ...); ``renamed``: run.json keys of older checkpoints -> today's names;
    ``flag``: an option's command-line spelling; ``extend``: options a resumed run is expected to change (the
    total step count): taken from the run when not given, never warned about when given."""
    flag = flag or (lambda dest: "--" + dest.replace("_", "-"))
    explicit = getattr(args, "explicit", None)
    explicit = set(vars(args)) if explicit is None else set(explicit)
    run = {(renamed or {}).get(k, k): v for k, v in run.items()}
    for dest, old in run.items():
        if dest in skip or not hasattr(args, dest):
            continue
        new = getattr(args, dest)
        same = json.dumps(new, default=str) == json.dumps(old, default=str)
        if dest not in explicit:
            if dest == "buckets" and old is not None:
                old = [tuple(b) for b in old]
            setattr(args, dest, old)
        elif not same and dest not in extend:
            if dest in fixed:
                raise UsageError(
                    f"--resume: {flag(dest)} {new} does not fit the checkpoint {path!r} (trained with "
                    f"{flag(dest)} {old}); leave {flag(dest)} out to continue that run"
                )
            print(
                f"warning: {flag(dest)} {new} differs from the checkpoint's run ({old}); using {new}", file=sys.stderr
            )
