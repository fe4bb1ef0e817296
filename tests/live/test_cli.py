"""`live-v2v`'s command line as a user meets it: a mistyped flag is answered by the command that
was typed."""

from __future__ import annotations

import pytest

from live.cli import main


@pytest.mark.parametrize(
    ("argv", "usage", "prog"),
    [
        (["serve", "--bogus"], "usage: live-v2v serve [-h] [--host HOST]", "live-v2v serve"),
        (["--bogus"], "usage: live-v2v serve [-h] [--host HOST]", "live-v2v serve"),
        (["models", "list", "--bogus"], "usage: live-v2v models list [-h]", "live-v2v models list"),
    ],
    ids=["serve", "bare", "models-list"],
)
def test_an_unknown_flag_shows_the_usage_of_the_command_typed(argv, usage, prog, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert err.rstrip().endswith(f"{prog}: error: unrecognized arguments: --bogus"), err
    assert "COMMAND ..." not in err
