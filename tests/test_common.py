"""opensora_fast.common: command-line flags derived from dataclass fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from opensora_fast.common import add_options, option, options_from


@dataclass
class _Opts:
    switch: bool = option(False, "off unless given")
    cleaning: bool = option(True, "on unless --no-cleaning", flag="--no-cleaning")
    steps: int = option(3, "a number")


def _parse(argv):
    p = argparse.ArgumentParser()
    add_options(p, _Opts)
    return options_from(_Opts, p.parse_args(argv))


def test_bool_fields_become_switches_and_no_flags():
    assert _parse([]) == _Opts(False, True, 3)
    assert _parse(["--switch", "--no-cleaning", "--steps", "7"]) == _Opts(True, False, 7)
    with pytest.raises(SystemExit):  # --no-X takes no value
        _parse(["--no-cleaning", "yes"])


def test_true_default_bool_needs_a_no_flag():
    @dataclass
    class Bad:
        cleaning: bool = option(True, "on by default")

    with pytest.raises(ValueError, match="cleaning.*--no-"):
        add_options(argparse.ArgumentParser(), Bad)


def test_resume_options_come_from_the_run(capsys):
    from opensora_fast.common import UsageError, apply_resume_options

    run = {"steps": 2, "lr": 1e-3, "model_config": "tiny", "out_dir": "a"}
    args = argparse.Namespace(steps=4, lr=5e-4, model_config="release", out_dir="b", explicit={"steps", "out_dir"})
    apply_resume_options(args, run, "ckpt", skip=("out_dir",), fixed=("model_config",))
    assert (args.steps, args.lr, args.model_config, args.out_dir) == (4, 1e-3, "tiny", "b")
    assert capsys.readouterr().err == ""  # more steps is how a run is continued: no warning
    args = argparse.Namespace(steps=4, lr=5e-4, model_config="tiny", explicit={"lr"})
    apply_resume_options(args, run, "ckpt", fixed=("model_config",))
    assert args.lr == 5e-4 and args.steps == 2 and "--lr 0.0005 differs" in capsys.readouterr().err
    args = argparse.Namespace(model_config="release", explicit={"model_config"})
    with pytest.raises(UsageError, match="--model-config release does not fit the checkpoint 'ckpt'"):
        apply_resume_options(args, run, "ckpt", fixed=("model_config",))


def test_option_groups_and_exposed_fields_of_a_plain_dataclass():
    @dataclass
    class Grouped:
        a: int = option(1, "first")
        b: float | None = option(None, "in the group", parse=float, group="the group", metavar="X")
        c: str = option("s", "also in the group", choices=("s", "t"), group="the group")

    p = argparse.ArgumentParser()
    add_options(p, Grouped)
    group = next(g for g in p._action_groups if g.title == "the group")
    assert [a.dest for a in group._group_actions] == ["b", "c"]
    assert options_from(Grouped, p.parse_args(["--b", "2", "--c", "t"])) == Grouped(1, 2.0, "t")

    @dataclass
    class Plain:  # no option() fields: the flags are named by the caller
        out: str = "o"
        quiet: bool = False
        progress: bool = True
        hidden: int = 3

    from opensora_fast.common import option_meta

    q = argparse.ArgumentParser()
    expose = {"progress": option_meta("bars", flag="--no-progress"), "out": option_meta("where")}
    add_options(q, Plain, expose=expose)
    assert [a.dest for a in q._actions[1:]] == ["progress", "out"]  # in expose's order
    assert options_from(Plain, q.parse_args([])) == Plain()
    assert options_from(Plain, q.parse_args(["--no-progress", "--out", "x"])) == Plain(out="x", progress=False)
    with pytest.raises(ValueError, match="no field"):
        add_options(argparse.ArgumentParser(), Plain, expose={"nope": option_meta("x")})
