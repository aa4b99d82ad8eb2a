"""The shared argument helpers: integer ranges and leftover --section.key=value arguments."""

import argparse

import pytest

from clipft.cli.args import _split_extra, int_range
from clipft.config import ConfigError


def test_int_range_accepts_bounds_and_refuses_the_rest():
    parse = int_range(1, 10)
    assert parse("1") == 1 and parse("10") == 10
    for bad, match in (("0", "must be in"), ("11", "must be in"), ("x", "expected an integer")):
        with pytest.raises(argparse.ArgumentTypeError, match=match):
            parse(bad)
    assert int_range(0)("123456") == 123456


def test_leftover_overrides():
    assert _split_extra(["--train.lr=0.1", "--train.epochs", "3"]) == ["train.lr=0.1", "train.epochs=3"]
    with pytest.raises(ConfigError, match="unrecognised argument"):
        _split_extra(["--nodot"])
    with pytest.raises(ConfigError, match="missing value"):
        _split_extra(["--train.lr"])
