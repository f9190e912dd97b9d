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
