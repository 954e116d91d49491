"""Every `admkit` command written in the README parses with the real command line.

The commands that need released checkpoints or GPUs cannot run here; parsing them catches renamed
or removed options, and the CLI tests run each command for real on tiny models.
"""

import re
import shlex
from pathlib import Path

import pytest

from admkit.cli import build_parser

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "admkit " in line and not line.startswith("make"):
                commands.append(line[line.index("admkit ") :].split("#")[0])
    commands += re.findall(r"`(admkit [^`]+)`", text)
    return [c.strip() for c in commands if c.strip() != "admkit demo --out demo"]


def test_readme_has_commands():
    assert len(readme_commands()) >= 10


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    assert args.command == argv[0]
