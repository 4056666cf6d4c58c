"""The researcher's workflow through the console scripts: every argument and
file checked before a model loads, one-line errors naming the argument, the
model pair checked like `patch` does, --targets bringing its configuration,
--json/--save-offsets, logging (one handler, --quiet silencing transformers,
--version), Ctrl-C, help on every flag, equal defaults across tools."""

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.tools import cli, console, data

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

# PYTHONSAFEPATH: `python -m actreplay_ext` (and torchrun's workers) import the installed
# package, not the source tree in the working directory, which has no compiled _C in CI.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
FAST = ["--layers", "3", "--lr", "0.005", "--steps", "3", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The embedded pair saved as checkpoints, a Qwen2-VL base, a LLaVA model, an image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("workflow")
    base, rlvr = tiny.save_pair(str(root))
    q2_base, _ = tiny.save_pair(str(root / "qwen2"), family="qwen2_vl")
    llava = str(root / "llava")
    tiny.make_llava().save_pretrained(llava)
    rng = torch.Generator().manual_seed(0)
    image = str(root / "noise.png")
    Image.fromarray((torch.rand(56, 84, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(image)
    return {"base": base, "rlvr": rlvr, "qwen2_base": q2_base, "llava": llava, "image": image, "root": root}


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights load: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(data, "load_model", refuse)


def error_of(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    return lines[-1]


def run_args(ckpt, *extra):
    return ["--quiet", "run", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--image", ckpt["image"],
            "--prompt", "what is 2 + 2 ?", *extra]


@pytest.mark.parametrize("change, message", [
    (["--image", "missing.png"], "--image/--video: image 'missing.png' not found"),
    (["--video", "clip.mp4"], "--image/--video: video 'clip.mp4' not found"),
    (["--lr", "-1"], "'lr' must be >= 0"),
    (["--layers", "9"], "config.layers = 9 exceeds the 4 decoder layers of the RLVR model"),
    (["--layers", "1,4"], "config.layers = (1, 4) exceeds the 4 decoder layers of the RLVR model"),
    (["--layers", "3,1"], "'layers' must be a count >= 1 or a non-empty list of layer indices >= 0 in ascending"),
    (["--save-targets", "/nonexistent/dir/t.safetensors"], "--save-targets: the directory '/nonexistent/dir' does not"),
    (["--json", "/nonexistent/r.json"], "--json: the directory '/nonexistent' does not exist"),
    (["--targets", "missing.safetensors"], "--targets: 'missing.safetensors' not found"),
])
def test_run_checks_everything_before_loading_a_model(ckpt, capsys, no_weights, change, message):
    argv = run_args(ckpt)
    if change[0] in argv:  # replace the option's value
        i = argv.index(change[0])
        argv[i + 1] = change[1]
    else:
        argv += change
    last = error_of(capsys, argv)
    assert last.startswith("actreplay run: error: ") and message in last, last


@pytest.mark.parametrize("arg", ["--base", "--rlvr"])
def test_a_missing_local_checkpoint_is_not_found_not_a_bad_hub_id(ckpt, capsys, no_weights, arg):
    argv = run_args(ckpt)
    argv[argv.index(arg) + 1] = str(ckpt["root"] / "no" / "such" / "checkpoint")
    last = error_of(capsys, argv)
    assert f"{arg}: " in last and "not found (no such directory)" in last and "Repo id" not in last


def test_the_model_pair_is_checked_like_patch_does(ckpt, capsys, no_weights):
    """A Qwen2-VL base with a Qwen2.5-VL RLVR model, and LLaVA with Qwen, are refused by check_pair."""
    argv = run_args(ckpt)
    argv[argv.index("--base") + 1] = ckpt["qwen2_base"]
    last = error_of(capsys, argv)
    assert "differ in model class: RLVR has Qwen2_5_VLForConditionalGeneration, base has Qwen2VL" in last
    argv[argv.index("--base") + 1] = ckpt["llava"]
    assert "differ in model class" in error_of(capsys, argv)
    rows = ckpt["root"] / "pair_rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "image": ckpt["image"], "answer": "1"}) + "\n")
    configs = ckpt["root"] / "pair_configs.json"
    configs.write_text(json.dumps([{"name": "low", "layers": 3}]))
    pair = ["--base", ckpt["qwen2_base"], "--rlvr", ckpt["rlvr"], "--data", str(rows)]
    assert "differ in model class" in error_of(capsys, ["--quiet", "ablate", *pair, "--configs", str(configs)])
    assert "differ in model class" in error_of(capsys, ["--quiet", "passk", *pair, "--out", str(ckpt["root"] / "pk")])
    assert "differ in model class" in error_of(capsys, ["--quiet", "analyze", *pair, "--out", str(ckpt["root"] / "a")])


def test_patch_refuses_a_pair_of_two_families():
    base = tiny.make_model("qwen2_vl")
    rlvr = tiny.make_model("qwen2_5_vl")
    with pytest.raises(ValueError, match="differ in model class"):
        ar.patch(rlvr, base=base)


@pytest.mark.parametrize("configs, message", [
    ('[{"name": "a", "layers": 3, "learning_rate": 1}]', "(a): unknown key(s) 'learning_rate'"),
    ('[{"name": "a"}, {"name": "a"}]', "[1]: duplicate name 'a'"),
    ('[{"name": "a", "lr": -2}]', "(a): ReplayConfig: 'lr' must be >= 0"),
    ('[{"name": "a", "layers": 12}]', "(a): actreplay_ext: config.layers = 12 exceeds the 4 decoder layers"),
    ('{"name": "a"}', "must be a non-empty list"),
    ('[{"name": "a",', "not JSON"),
])
def test_ablate_checks_its_configs_before_loading(ckpt, capsys, no_weights, configs, message):
    rows = ckpt["root"] / "rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "image": ckpt["image"]}) + "\n")
    path = ckpt["root"] / "configs.json"
    path.write_text(configs)
    last = error_of(capsys, ["--quiet", "ablate", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--data",
                             str(rows), "--configs", str(path)])
    assert last.startswith("actreplay ablate: error: --configs") and message in last, last


def test_passk_and_analyze_check_rows_before_loading(ckpt, capsys, no_weights, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "image": ckpt["image"], "answer": "1"}) + "\n"
                    + json.dumps({"question": "q", "image": "gone.png", "answer": "1"}) + "\n")
    common = ["--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--data", str(rows), "--out", str(tmp_path / "o")]
    for tool in ("passk", "analyze"):
        last = error_of(capsys, ["--quiet", tool, *common])
        assert f"{rows}:2: image '{tmp_path / 'gone.png'}' not found" in last, last
    rows.write_text(json.dumps({"question": "q", "image": ckpt["image"]}) + "\n")
    assert "rows without an 'answer'" in error_of(capsys, ["--quiet", "passk", *common])
    assert "--k must be in 1..--samples (2)" in error_of(capsys, ["--quiet", "passk", *common, "--samples", "2",
                                                                  "--k", "3"])
    (tmp_path / "file").write_text("")
    assert "--out: " in error_of(capsys, ["--quiet", "passk", "--demo", "--out", str(tmp_path / "file")])
    rows.write_text(json.dumps({"question": "q", "image": ckpt["image"], "answer": "1"}) + "\n")
    assert "--save-offsets: --preset deepeyes-7b is a direct substitution (mode='direct'), which learns no " \
        "offsets" in error_of(capsys, ["--quiet", "passk", *common, "--preset", "deepeyes-7b", "--save-offsets",
                                       str(tmp_path / "offsets")])


def test_targets_bring_their_layers_and_refuse_a_conflicting_override(ckpt, capsys, tmp_path):
    targets = str(tmp_path / "t.safetensors")
    assert cli.main(run_args(ckpt, *FAST, "--save-targets", targets)) == 0
    first = capsys.readouterr().out
    argv = ["--quiet", "run", "--rlvr", ckpt["rlvr"], "--image", ckpt["image"], "--prompt", "what is 2 + 2 ?",
            "--lr", "0.005", "--steps", "3", "--max-new-tokens", "4", "--targets", targets]
    assert cli.main(argv) == 0  # no --layers: the file's 3 layers, not the preset's 16
    again = capsys.readouterr().out
    assert "in layers 0-2" in again and again.split("(")[0] == first.split("(")[0]
    last = error_of(capsys, argv + ["--layers", "2"])
    assert "--layers 2 conflicts with --targets" in last and "made with layers = 3" in last
    assert cli.main(argv + ["--layers", "0,1,2"]) == 0  # the file's layers, written as a list
    other = argv[:]
    other[other.index("what is 2 + 2 ?")] = "another question"
    assert "was made for another prompt" in error_of(capsys, other)


def test_targets_made_for_other_pixels_are_refused_before_a_model_loads(ckpt, capsys, tmp_path, monkeypatch):
    """The same question and an image of the same size give the same input_ids: the
    targets record the image's pixels, and another image is refused by name."""
    from PIL import Image

    targets = str(tmp_path / "t.safetensors")
    assert cli.main(run_args(ckpt, *FAST, "--save-targets", targets)) == 0
    capsys.readouterr()
    other = str(tmp_path / "other.png")
    rng = torch.Generator().manual_seed(9)
    Image.fromarray((torch.rand(56, 84, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(other)
    argv = ["--quiet", "run", "--rlvr", ckpt["rlvr"], "--image", other, "--prompt", "what is 2 + 2 ?",
            "--lr", "0.005", "--steps", "3", "--max-new-tokens", "4", "--targets", targets]

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the images were checked")

    with monkeypatch.context() as m:
        m.setattr(data, "load_model", refuse)
        assert "was made for other images or video" in error_of(capsys, argv)
    argv[argv.index(other)] = ckpt["image"]
    assert cli.main(argv) == 0  # its own image


@pytest.mark.parametrize("value", ["1,x", "3,", ",3", "1,,2"])
def test_a_malformed_layer_list_is_an_argparse_error(ckpt, capsys, no_weights, value):
    """'3,' once meant layer 3 alone (an empty entry dropped), where a count of 3 was likely meant."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(run_args(ckpt, "--layers", value))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1] == (
        f"actreplay run: error: argument --layers: expected a count like 16 or a list like 0,2,4, got {value!r}")


def test_a_layer_list_runs_records_itself_and_travels_with_its_targets(ckpt, capsys, tmp_path):
    """--layers 1,3 (the authors' list form): the summary names the layers, the JSON and the
    targets file record the list, and --targets brings it back (3 and 0,1,2 are one config)."""
    targets, report = str(tmp_path / "t.safetensors"), tmp_path / "run.json"
    fast = [a if a != "3" or i != 1 else "1,3" for i, a in enumerate(FAST)]
    assert cli.main(run_args(ckpt, *fast, "--save-targets", targets, "--json", str(report))) == 0
    out = capsys.readouterr().out
    rec = json.loads(report.read_text())
    assert rec["config"]["layers"] == [1, 3] and len(rec["selected"]) == 4 and rec["selected"][0::2] == [0, 0]
    assert "in layers 1,3" in out.strip().splitlines()[-1]
    argv = ["--quiet", "run", "--rlvr", ckpt["rlvr"], "--image", ckpt["image"], "--prompt", "what is 2 + 2 ?",
            "--lr", "0.005", "--steps", "3", "--max-new-tokens", "4", "--targets", targets]
    assert cli.main(argv + ["--json", str(report)]) == 0
    assert json.loads(report.read_text())["config"]["layers"] == [1, 3]
    capsys.readouterr()
    last = error_of(capsys, argv + ["--layers", "4"])
    assert "--layers 4 conflicts with --targets" in last and "made with layers = [1, 3]" in last
    assert cli.main(argv + ["--layers", "1,3"]) == 0  # the same list is no conflict


def test_run_takes_the_optimizer_and_records_it(ckpt, capsys, tmp_path):
    """--optimizer lbfgs without --lr takes lbfgs's own step (not the preset's sgd lr = 10)."""
    report = tmp_path / "run.json"
    argv = run_args(ckpt, "--layers", "3", "--steps", "4", "--max-new-tokens", "4", "--optimizer", "lbfgs",
                    "--tol", "1e-3", "--json", str(report))
    assert cli.main(argv) == 0
    config = json.loads(report.read_text())["config"]
    assert config["optimizer"] == "lbfgs" and config["lr"] == 0.05 and config["tol"] == 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(run_args(ckpt, "--optimizer", "adam"))
    assert "argument --optimizer: invalid choice: 'adam'" in capsys.readouterr().err


def test_run_json_and_saved_offsets_record_the_run(ckpt, capsys, tmp_path):
    report, offsets = tmp_path / "run.json", tmp_path / "offsets.safetensors"
    assert cli.main(run_args(ckpt, *FAST, "--json", str(report), "--save-offsets", str(offsets))) == 0
    out = capsys.readouterr().out
    rec = json.loads(report.read_text())
    assert rec["answers"]["without_replay"] in out and rec["answers"]["with_replay"] in out
    assert out.strip().splitlines()[-1].startswith(("replay: ", "no-op replay: "))
    assert len(rec["losses"]) == 3 and len(rec["selected"]) == 3 and rec["n_visual"] == 6
    assert rec["config"]["layers"] == 3 and rec["config"]["lr"] == 0.005 and rec["config"]["topv"] == 50
    assert rec["models"]["rlvr"]["path"] == ckpt["rlvr"] and {"load_rlvr_s", "generate_with_s"} <= set(rec["timings"])
    assert rec["versions"]["torch"] == torch.__version__
    saved = ar.ReplayResult.load(str(offsets))
    assert saved.losses == pytest.approx(rec["losses"]) and saved.config["lr"] == 0.005


def test_logging_one_handler_no_root_and_quiet_silences_transformers(ckpt):
    pkg, root = logging.getLogger("actreplay_ext"), logging.getLogger()
    before = (list(pkg.handlers), pkg.level, pkg.propagate, list(root.handlers))
    args = argparse.Namespace(quiet=True, verbose=False, log_level=None)
    restore = console.setup_logging(args)
    console.setup_logging(args)  # twice (tests, notebooks): still one handler of ours
    ours = [h for h in pkg.handlers if type(h).__name__ == "_OneHandler"]
    assert len(ours) == 1 and not pkg.propagate and pkg.level == logging.WARNING
    assert list(root.handlers) == before[3]  # the root logger is not configured
    restore()
    assert (list(pkg.handlers), pkg.level, pkg.propagate, list(root.handlers)) == before
    proc = subprocess.run(["actreplay", "--quiet", "run", *run_args(ckpt, *FAST)[2:]], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "%|" not in proc.stderr and proc.stderr.strip() == "", proc.stderr
    loud = subprocess.run(["actreplay", "run", *run_args(ckpt, *FAST)[2:]], env=ENV, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in loud.stderr.splitlines() if line.startswith("loading the RLVR model")]
    assert loud.returncode == 0 and len(lines) == 1  # the library's log lines, once each


def test_version_and_help_on_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"actreplay_ext {ar.__version__} (torch ")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in [("actreplay", parser), *sub.choices.items()]:
        for action in p._actions:
            if action.option_strings and action.help != argparse.SUPPRESS:
                assert action.help, f"{name} {action.option_strings} has no help text"
    with pytest.raises(SystemExit):  # no abbreviations: --n is not --max-new-tokens
        cli.main(["passk", "--demo", "--out", "x", "--max-new", "3"])


def test_equal_dtype_defaults_across_tools():
    parser = cli.build_parser()
    dtypes = set()
    for argv in (["run", "--rlvr", "r", "--prompt", "p"], ["analyze", "--out", "o"], ["ablate"],
                 ["passk", "--out", "o"]):
        args = parser.parse_args(argv)
        dtypes.add(console.load_kwargs(args)["dtype"])
    assert dtypes == {"bfloat16" if torch.cuda.is_available() else "float32"}


def test_interrupt_is_one_line_exit_130_and_nothing_half_written(monkeypatch, capsys, tmp_path):
    from actreplay_ext.tools import passk
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(passk, "sample", interrupted)
    assert cli.main(["--quiet", "passk", "--demo", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "actreplay passk: interrupted" and not (tmp_path / "results.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["records.rank0.jsonl", "run.json"]


def test_ctrl_c_on_the_console_script(tmp_path):
    """A real SIGINT while Pass@K samples: exit 130, "interrupted", no traceback, no results file."""
    proc = subprocess.Popen(["actreplay", "passk", "--demo", "--quiet", "--out", str(tmp_path), "--samples", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = tmp_path / "records.rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (records.exists() and records.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and not (tmp_path / "results.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    for line in records.read_text().splitlines():
        json.loads(line)  # every record whole


def _write_video(path, frames: int, fps: int, size=(48, 64)):
    av = pytest.importorskip("av", reason="the video extra (PyAV) decodes video files")
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            pixels = (rng.random((*size, 3)) * 255).astype("uint8")
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_qwen2_5_vl_sees_how_far_apart_the_frames_are(ckpt, tmp_path):
    """Qwen2.5-VL's temporal positions scale with the seconds per temporal
    patch (second_per_grid_ts = 2 frames / the frames' rate). Frames reached the
    processor without their rate, so transformers 5 assumed 24 fps (0.083 s for
    every clip); the rate the file was sampled at is passed now, on 4.57 and 5.x."""
    processor = data.load_processor(ckpt["rlvr"])
    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    _write_video(short, frames=10, fps=4)  # 2.5 s: a frame every 0.5 s
    _write_video(long, frames=128, fps=1, size=(16, 16))  # 128 s: 64 frames at most, one every 2 s
    for clip, seconds_apart in ((short, 0.5), (long, 2.0)):
        enc = data.encode(processor, data.Row("v", "what happens ?", video=str(clip)))
        assert float(enc["second_per_grid_ts"][0]) == pytest.approx(2 * seconds_apart), clip.name
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(data.decode_video(str(short))):
        frame.save(frames / f"{i:03d}.png")
    enc = data.encode(processor, data.Row("v", "what happens ?", video=str(frames)))
    assert float(enc["second_per_grid_ts"][0]) == pytest.approx(2 / data.VIDEO_FPS)  # frame folders: VIDEO_FPS


def test_a_video_file_is_decoded_with_pyav_at_two_frames_a_second(ckpt, capsys, tmp_path):
    """The `video` extra's path: PyAV decodes the file (no torchcodec or FFmpeg
    install needed), a frame every 0.5 s; `run --video clip.mp4` replays it."""
    clip = tmp_path / "clip.mp4"
    _write_video(clip, frames=10, fps=4)  # 2.5 s: frames at 0, 0.5, 1.0, 1.5, 2.0
    frames = data.decode_video(str(clip))
    assert len(frames) == 5 and frames[0].size == (64, 48)
    assert len(data.decode_video(str(clip), max_frames=2)) == 2
    assert cli.main(["--quiet", "run", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--video", str(clip),
                     "--prompt", "what happens ?", *FAST]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    # 5 frames -> 3 temporal patches (pairs, the last padded) x the frame's merged patches
    processor = data.load_processor(ckpt["rlvr"])
    enc = data.encode(processor, data.Row("v", "what happens ?", video=str(clip)))
    n_video = int(enc["video_grid_thw"].prod()) // 4
    assert int(enc["video_grid_thw"][0, 0]) == 3 and f" {n_video} visual tokens" in summary


def test_video_errors_are_one_line(ckpt, capsys, tmp_path, monkeypatch):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    argv = ["--quiet", "run", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--prompt", "q", *FAST]
    assert "cannot be decoded" in error_of(capsys, argv + ["--video", str(broken)])
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    last = error_of(capsys, argv + ["--video", str(broken)])
    assert "decoding a video file needs PyAV: pip install 'actreplay_ext[video]'" in last


def test_video_sampling_starts_at_the_first_frame_not_at_time_zero(tmp_path):
    """A clip whose timestamps start at 5 s is sampled as the same clip starting at
    0 s: the sampling clock once started at 0 and kept every frame until it caught up."""
    av = pytest.importorskip("av")
    import fractions

    import numpy as np

    def make(path, first, n=50, fps=25):
        with av.open(str(path), "w") as c:
            s = c.add_stream("mpeg4", rate=fps)
            s.width = s.height = 64
            s.pix_fmt = "yuv420p"
            s.codec_context.time_base = fractions.Fraction(1, fps)
            for i in range(n):
                img = np.zeros((64, 64, 3), np.uint8)
                img[:, :, 0] = i * 5  # the frame's index, in red
                f = av.VideoFrame.from_ndarray(img, format="rgb24")
                f.pts = i + first
                for p in s.encode(f):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)

    kept = {}
    for name, first in (("at0.mp4", 0), ("at5s.mp4", 125)):
        make(tmp_path / name, first)
        frames, rate = data._decode_video(str(tmp_path / name), 2.0, 64)
        kept[name] = ([int(round(np.asarray(f)[0, 0, 0] / 5)) for f in frames], rate)
    assert kept["at0.mp4"] == kept["at5s.mp4"]
    assert kept["at0.mp4"][0] == [0, 12, 25, 37] and kept["at0.mp4"][1] == 2.0


def test_the_recorded_commit_is_the_packages_own(tmp_path):
    """Installed inside a user's project (project/.venv/...), the package once recorded the
    project's commit as its own; from its own checkout it records that checkout's."""
    import shutil
    import subprocess

    from actreplay_ext.tools import provenance
    if shutil.which("git") is None:
        pytest.skip("needs git")
    ours = provenance.git_revision()
    here = os.path.dirname(os.path.abspath(provenance.__file__))
    tracked = subprocess.run(["git", "-C", here, "ls-files", "--error-unmatch", provenance.__file__],
                             capture_output=True).returncode == 0
    assert (ours is not None) == tracked
    project = tmp_path / "project"
    site = project / ".venv" / "site"
    shutil.copytree(here, site / "actreplay_ext", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "project"]):
        subprocess.run(["git", "-C", str(project), *cmd], check=True, env=env, capture_output=True)
    code = "import provenance_copy as p; print(p.git_revision())"
    shutil.copy(site / "actreplay_ext" / "provenance.py", site / "actreplay_ext" / "provenance_copy.py")
    out = subprocess.run([sys.executable, "-c", code], cwd=site / "actreplay_ext", capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(site / "actreplay_ext")})
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stdout + out.stderr
