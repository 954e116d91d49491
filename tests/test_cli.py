import pytest

from admkit.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ["train", "sample", "evaluate", "demo", "presets"]:
        assert command in out
