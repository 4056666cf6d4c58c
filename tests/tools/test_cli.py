"""The `actreplay` command: demo on the embedded pair, run on checkpoints
loaded from disk (the embedded pair saved with a processor), analyze, help."""

import json
import os
import re

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.tools import cli, data

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

RUN_ARGS = ["--layers", "3", "--lr", "0.005", "--steps", "5", "--max-new-tokens", "6"]


def test_demo_prints_the_replay(capsys):
    assert cli.main(["--quiet", "demo", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer  selected visual tokens" in out and "/ 22" in out
    losses = [float(line.split()[1]) for line in out.split("step  loss\n")[1].split("\n\n")[0].splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "answer without replay:" in out and "answer with replay:" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(command in out for command in ("demo", "run", "analyze"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The embedded pair as two checkpoint directories, and two image files."""
    from PIL import Image

    root = tmp_path_factory.mktemp("checkpoints")
    base, rlvr = tiny.save_pair(str(root))
    images = []
    for i, (h, w) in enumerate([(60, 90), (56, 56)]):
        rng = torch.Generator().manual_seed(i)
        pixels = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        images.append(str(root / f"image{i}.png"))
        Image.fromarray(pixels).save(images[-1])
    return base, rlvr, images


def run_output(capsys, *args):
    assert cli.main(["--quiet", "run", *args]) == 0
    return capsys.readouterr().out


def answers(out):
    return out.split("without replay:\n")[1].split("\n")[0], out.split("with replay:\n")[1].split("\n")[0]


def test_run_answers_with_and_without_replay(checkpoints, capsys, tmp_path):
    base, rlvr, images = checkpoints
    targets = str(tmp_path / "targets.safetensors")
    prompt = ["--rlvr", rlvr, "--image", *images, "--prompt", "what is 3 + 4 ?", *RUN_ARGS]
    out = run_output(capsys, "--base", base, *prompt, "--save-targets", targets)
    summary = out.strip().splitlines()[-1]
    n_vis = int(summary.split("replay: ")[1].split(" visual tokens")[0])
    selected = [int(x) for x in summary.split("selected ")[1].split(" in layers")[0].split()]
    first, last = (float(x) for x in summary.split("loss ")[1].split(" over")[0].split(" -> "))
    assert "in layers 0-2;" in summary
    assert n_vis == 6 + 4 and len(selected) == 3 and 0 < max(selected) < n_vis
    assert last < first

    # The same replay in-process, on the checkpoints loaded the same way.
    model, processor = data.load_model(rlvr, "float32", None, "sdpa"), data.load_processor(rlvr)
    inputs = data.encode(processor, data.Row("x", "what is 3 + 4 ?", images=images))
    cfg = ar.ReplayConfig(layers=3, lr=0.005, steps=5)
    gen = dict(max_new_tokens=6, do_sample=False)
    with ar.patch(model, base=data.load_model(base, "float32", None, "sdpa"), config=cfg):
        replayed = model.generate(**inputs, **gen)
    plain = model.generate(**inputs, **gen)
    start = inputs["input_ids"].shape[1]
    assert answers(out) == (data.decode_new(processor, plain, start)[0], data.decode_new(processor, replayed, start)[0])

    # Saved targets stand in for the base model.
    assert os.path.getsize(targets) > 0
    again = run_output(capsys, *prompt, "--targets", targets)
    untimed = lambda text: re.sub(r"\([0-9.]+ s\)", "", text)  # noqa: E731
    assert untimed(again) == untimed(out)


def test_run_needs_a_base_or_targets(checkpoints, capsys):
    _, rlvr, images = checkpoints
    assert cli.main(["--quiet", "run", "--rlvr", rlvr, "--image", images[0], "--prompt", "hi"]) == 2
    assert "give --base (the base checkpoint) or --targets" in capsys.readouterr().err


def test_analyze_demo_writes_csv_and_plots(tmp_path, capsys):
    out_dir = tmp_path / "analysis"
    assert cli.main(["--quiet", "analyze", "--demo", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "kl_by_entropy_decile.png" in printed
    names = sorted(os.listdir(out_dir))
    assert names == ["entropy_histogram.csv", "entropy_histogram.png", "kl_by_entropy_decile.csv",
                     "kl_by_entropy_decile.png", "kl_heatmap.png"]
    for png in ("entropy_histogram.png", "kl_by_entropy_decile.png", "kl_heatmap.png"):
        with open(out_dir / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import csv

    with open(out_dir / "kl_by_entropy_decile.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["layer"]) for r in rows}) == [0, 1, 2, 3]
    tokens = {l: sum(int(r["tokens"]) for r in rows if int(r["layer"]) == l) for l in range(4)}
    assert len(set(tokens.values())) == 1 and tokens[0] > 10  # every layer sees the same visual tokens
    assert all(float(r["mean_kl"]) > 0 for r in rows)
    assert {(r["base"], r["rlvr"]) for r in rows} == {("tiny base", "tiny RLVR")}  # the models named in every row


def test_analyze_needs_its_inputs(capsys, tmp_path):
    assert cli.main(["--quiet", "analyze", "--out", str(tmp_path)]) == 2
    assert "without --demo, give --base, --rlvr, --data" in capsys.readouterr().err


def test_synthetic_rows_roundtrip_through_jsonl(tmp_path):
    """read_jsonl resolves relative paths and keeps ids, answers and choices."""
    (tmp_path / "img").mkdir()
    lines = [{"id": "a", "question": "q1", "image": "img/x.png", "answer": 3},
             {"question": "q2", "images": ["img/x.png", "/abs/y.png"], "choices": ["1", "2"], "answer": "B"},
             {"question": "q3", "video": "img"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = data.read_jsonl(str(path), check_files=False)
    assert [r.id for r in rows] == ["a", "2", "3"]
    assert rows[0].images == [str(tmp_path / "img/x.png")] and rows[0].answer == "3"
    assert rows[1].images[1] == "/abs/y.png" and rows[1].choices == ["1", "2"]
    assert rows[2].video == str(tmp_path / "img")
    assert data.question_text(rows[1]) == "q2\nA. 1\nB. 2"
    path.write_text('{"question": "ok"}\n{"image": "x.png"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: each row needs a 'question' string"):
        data.read_jsonl(str(path))
    path.write_text('{"question": "ok"}\n{"question": "q", "image": "img/missing.png"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: image '.*img/missing.png' not found"):
        data.read_jsonl(str(path))
    path.write_text('{"question": "q", "video": "clip.mp4"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: video '.*clip.mp4' not found"):
        data.read_jsonl(str(path))


def test_bad_input_is_one_line_not_a_traceback(checkpoints, capsys):
    base, rlvr, images = checkpoints
    code = cli.main(["run", "--base", base, "--rlvr", rlvr, "--image", images[0], "--prompt", "hi",
                     "--quiet", "--layers", "9"])  # --quiet after the command works too
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after transformers' own loading progress
    assert code == 2 and "Traceback" not in err
    assert last.startswith("actreplay run: error: ") and "layers = 9" in last and "4 decoder layers" in last
    assert cli.main(["--quiet", "run", "--base", base, "--rlvr", str(images[0]) + ".missing", "--prompt", "hi"]) == 2
    assert "actreplay run: error:" in capsys.readouterr().err


def test_run_direct_preset_substitutes_like_patch(checkpoints, capsys, tmp_path):
    """--preset deepeyes-7b (direct substitution) with --layers 3 uses the first
    three published thresholds and answers as patch() does."""
    base, rlvr, images = checkpoints
    out = run_output(capsys, "--base", base, "--rlvr", rlvr, "--image", *images, "--prompt", "what is 3 + 4 ?",
                     "--preset", "deepeyes-7b", "--layers", "3", "--max-new-tokens", "6")
    assert "direct substitution at layers 0-2" in out
    model, processor = data.load_model(rlvr, "float32", None, "sdpa"), data.load_processor(rlvr)
    inputs = data.encode(processor, data.Row("x", "what is 3 + 4 ?", images=images))
    cfg = ar.ReplayConfig.preset("deepeyes-7b", layers=3, thresholds=list(ar.config.DIRECT_THRESHOLDS[:3]))
    with ar.patch(model, base=data.load_model(base, "float32", None, "sdpa"), config=cfg) as handle:
        replayed = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert sum(handle.last.selected) > 0  # something was substituted
    assert answers(out)[1] == data.decode_new(processor, replayed, inputs["input_ids"].shape[1])[0]
    targets = tmp_path / "t.safetensors"
    targets.write_bytes(b"")
    assert cli.main(["--quiet", "run", "--rlvr", rlvr, "--base", base, "--save-targets", str(targets), "--prompt",
                     "hi", "--preset", "deepeyes-7b", "--layers", "3"]) == 2
    assert "substitutes base activations directly" in capsys.readouterr().err


def test_run_with_a_video_directory(checkpoints, tmp_path, capsys):
    """--video takes a directory of frames (sorted by name)."""
    from PIL import Image

    base, rlvr, images = checkpoints
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.open(images[1]).rotate(90 * i).save(frames / f"{i:03d}.png")
    out = run_output(capsys, "--base", base, "--rlvr", rlvr, "--video", str(frames), "--prompt",
                     "how many frames are in this video ?", *RUN_ARGS)
    # 4 frames of 56 x 56: 2 temporal patches x 4 x 4 patches / 2 x 2 merge = 8 visual tokens
    assert "replay: 8 visual tokens" in out


def test_analyze_on_checkpoints_and_a_jsonl(checkpoints, tmp_path, capsys):
    base, rlvr, images = checkpoints
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"question": "what is 1 + 2 ?", "images": images}) + "\n"
                    + json.dumps({"question": "no image here"}) + "\n")
    out_dir = tmp_path / "analysis"
    assert cli.main(["--quiet", "analyze", "--base", base, "--rlvr", rlvr, "--data", str(rows), "--out",
                     str(out_dir), "--layers", "2"]) == 0
    import csv

    with open(out_dir / "kl_by_entropy_decile.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted({int(r["layer"]) for r in table}) == [0, 1]
    assert sum(int(r["tokens"]) for r in table if r["layer"] == "0") == 6 + 4  # the text-only row is skipped
    assert {(r["base"], r["rlvr"]) for r in table} == {("base", "rlvr")}  # the checkpoint directories' names
