"""`actreplay ablate --demo`: every configuration on every built-in prompt, one table."""

import json

from actreplay_ext.tools import ablate


def test_ablate_demo_writes_the_table(tmp_path, capsys):
    assert ablate.main(["--demo", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.load(open(tmp_path / "ablation.json"))
    rows = report["rows"]
    configs = [c["name"] for c in ablate.demo_setup()[3]]
    assert [r["config"] for r in rows] == [c for c in configs for _ in range(3)]
    by = {(r["config"], r["prompt"]): r for r in rows}
    assert by["baseline", "demo-0"]["losses"] == [] and by["baseline", "demo-0"]["note"] == "no replay"
    low = by["low (published)", "demo-0"]
    assert len(low["losses"]) == 10 and low["losses"][-1] < low["losses"][0]
    assert by["high", "demo-0"]["selected"] == low["selected"]  # as many as the low rule
    assert by["top-4", "demo-1"]["selected"] == [4, 4, 4]
    assert by["mid (inject 2)", "demo-0"]["selected"][:2] == [0, 0]
    assert sum(by["direct", "demo-0"]["selected"]) > 0 and by["direct", "demo-0"]["losses"] == []
    table = (tmp_path / "ablation.md").read_text()
    assert table.count("\n") == len(rows) + 2 and "| direct | demo-2 |" in table
    assert "| config | prompt |" in capsys.readouterr().out
