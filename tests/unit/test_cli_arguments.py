"""Command-line arguments a user can get wrong are refused by the parser, with the fix."""

import pytest

from proxy.cli import build_parser


@pytest.mark.parametrize("given, expected", [("1", 1), ("4", 4)])
def test_workers_accepts_one_or_more(given, expected):
    assert build_parser().parse_args(["serve", "--workers", given]).workers == expected


@pytest.mark.parametrize("given, message", [("0", "serves nothing"), ("-2", "serves nothing"), ("two", "not a whole number")])
def test_workers_refuses_what_serves_nothing(given, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--workers", given])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--workers" in error and message in error and "1 or more" in error
