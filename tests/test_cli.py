"""The `actreplay` command: demo on the embedded pair, help."""

from actreplay_ext import cli


def test_demo_prints_the_replay(capsys):
    assert cli.main(["--quiet", "demo", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer  selected visual tokens" in out and "/ 22" in out
    losses = [float(line.split()[1]) for line in out.split("step  loss\n")[1].split("\n\n")[0].splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "answer without replay:" in out and "answer with replay:" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
