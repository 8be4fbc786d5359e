"""The command line documents itself: every option of every command has help that states its default (a
value, "off" for a flag, or where it comes from), every command's --help ends with an example that parses,
and `bitsearch --version` answers."""
from __future__ import annotations

import argparse
import shlex

import pytest

from bitsearch import __version__
from bitsearch.cli import build_parser, main


def _commands():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices.items())


@pytest.mark.parametrize("name,parser", _commands(), ids=[n for n, _ in _commands()])
def test_every_option_says_what_it_does_and_its_default(name, parser):
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and not action.required:
            assert "default" in fmt._get_help_string(action), f"{name} {action.option_strings[0]}: no default"
    text = parser.format_help()
    assert "example:\n  bitsearch " in text
    # the example is a command this parser accepts (file arguments need not exist to parse)
    example = text.split("example:\n", 1)[1].split("\n  bitsearch ")[0].replace("\\\n", " ")
    argv = shlex.split(example.split("(", 1)[0])
    assert argv[0] == "bitsearch" and argv[1] == name
    build_parser().parse_args(argv[1:])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"bitsearch {__version__}"
