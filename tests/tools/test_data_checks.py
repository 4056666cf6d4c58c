"""A dataset and the checkpoints are checked before any model loads, and what is
written is strict JSON (issue 23, items 3-5 and 8): an empty data file once
"succeeded" with NaN scores, a misspelt image field made a row text-only in
silence, a broken image was found only after both models had loaded, and a
mistyped local checkpoint path went to the hub for 26 s of retries."""

import json
import logging
import math
import os

import pytest
import torch

from actreplay_ext.tools import checks, cli, console, data
from actreplay_ext.tools.console import UsageError


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "ok.png"
    Image.fromarray((torch.rand(28, 28, 3) * 255).to(torch.uint8).numpy()).save(path)
    return str(path)


def write_rows(tmp_path, *rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_data_file_without_rows_is_refused(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no rows"):
        data.read_jsonl(str(path))


@pytest.mark.parametrize("command", ["passk", "ablate", "analyze"])
def test_every_tool_refuses_an_empty_data_file_before_loading(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(data, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "configs.json").write_text(json.dumps([{"name": "a", "baseline": True}]))
    argv = {"passk": ["passk", "--base", "b", "--rlvr", "r", "--data", str(tmp_path / "empty.jsonl"), "--out",
                      str(tmp_path / "o")],
            "ablate": ["ablate", "--base", "b", "--rlvr", "r", "--data", str(tmp_path / "empty.jsonl"), "--configs",
                       str(tmp_path / "configs.json"), "--out", str(tmp_path / "o")],
            "analyze": ["analyze", "--base", "b", "--rlvr", "r", "--data", str(tmp_path / "empty.jsonl"), "--out",
                        str(tmp_path / "o")]}[command]
    code = cli.main(["--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "holds no rows" in err, err


@pytest.mark.parametrize("field, meant", [("img", "image"), ("imgs", "images"), ("vidoe", "video"),
                                          ("anwser", "answer"), ("choice", "choices"), ("questions", "question")])
def test_a_misspelt_row_field_is_refused_by_name(tmp_path, image, field, meant):
    row = {"question": "q", field: image if "im" in field or "vid" in field else "x"}
    if field == "questions":
        row = {"question": "q", "questions": "x"}
    path = write_rows(tmp_path, {"question": "first", "image": image}, row)
    with pytest.raises(ValueError, match=f"rows.jsonl:2: field '{field}' is not a row field; did you mean '{meant}'"):
        data.read_jsonl(path)


def test_metadata_fields_are_kept_out_and_text_only_rows_are_counted(tmp_path, image, caplog):
    path = write_rows(tmp_path, {"question": "a", "image": image, "category": "geometry", "source": "x"},
                      {"question": "b"}, {"question": "c"})
    with caplog.at_level(logging.WARNING, logger="actreplay_ext"):
        rows = data.read_jsonl(path)
    assert len(rows) == 3 and rows[0].images == [image]
    assert any("2 of 3 rows have no image or video" in r.getMessage() for r in caplog.records)


def test_a_broken_image_or_video_is_named_by_its_row_before_loading(tmp_path, image, capsys, monkeypatch):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    path = write_rows(tmp_path, {"question": "a", "image": image}, {"question": "b", "image": str(fake)})
    with pytest.raises(ValueError, match=r"rows.jsonl:2: image '.*fake.png' does not decode"):
        data.read_jsonl(path)
    monkeypatch.setattr(data, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code = cli.main(["--quiet", "passk", "--base", "b", "--rlvr", "r", "--data", path, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "rows.jsonl:2: image" in err and "does not decode" in err and err.count("\n") == 1
    frames = tmp_path / "frames"
    frames.mkdir()
    with pytest.raises(ValueError, match="v.jsonl:1: video directory .* holds no frame images"):
        data.read_jsonl(write_rows(tmp_path, {"question": "v", "video": str(frames)}, name="v.jsonl"))
    with pytest.raises(ValueError, match="f.jsonl:1: video frame .* does not decode"):
        data.read_jsonl(write_rows(tmp_path, {"question": "v", "video": [image, str(fake)]}, name="f.jsonl"))
    pytest.importorskip("av")
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="b.jsonl:1: video .*clip.mp4' does not decode"):
        data.read_jsonl(write_rows(tmp_path, {"question": "v", "video": str(broken)}, name="b.jsonl"))


def test_what_is_written_as_json_holds_no_nan(tmp_path):
    out = tmp_path / "r.json"
    console.write_json(str(out), {"pass@1": float("nan"), "ci": [float("nan"), math.inf], "n": 3})

    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    assert json.loads(out.read_text(), parse_constant=refuse) == {"pass@1": None, "ci": [None, None], "n": 3}


def test_a_mistyped_local_checkpoint_path_is_not_found_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pair" / "rlvr").mkdir(parents=True)
    assert checks.is_local("pair/rlvrr") and not checks.is_local("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(UsageError, match=r"--rlvr: 'pair/rlvrr' not found \(no such directory\)"):
        checks.checkpoint_config("pair/rlvrr", "--rlvr")
    assert not os.path.exists(tmp_path / "pair" / "rlvrr")
