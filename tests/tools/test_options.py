"""Every option means what it says, or is one line naming it (exit status 2)
before any model loads: counts are ints >= 1 for every command (0 was once
"the default" for passk/ablate --max-new-tokens and "everything" for analyze
--limit, -2 "all but two"); "-" is the standard output for `run --json` and
refused by every option that cannot write there (never a file named "-"); a
save that fails is one line naming its option; two outputs naming one file,
and --save-targets with --targets (nothing to save), are refused; an ablation
config's "baseline" is a JSON boolean (the string "false" once ran without
replay) and a baseline with replay fields is refused."""

import json
import os
import shutil

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.tools import ablate, cli, data, passk

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

FAST = ["--layers", "3", "--lr", "0.005", "--steps", "2", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("options")
    base, rlvr = tiny.save_pair(str(root))
    image = str(root / "noise.png")
    rng = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(56, 84, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(image)
    rows = root / "rows.jsonl"
    rows.write_text(json.dumps({"question": "q", "image": image, "answer": "1"}) + "\n")
    return {"base": base, "rlvr": rlvr, "image": image, "rows": str(rows)}


@pytest.fixture
def no_models(monkeypatch, tmp_path):
    """Fails the test if any model is built (a checkpoint or the demo's tiny
    pair): the options must be refused first. Runs in tmp_path, so that a file
    or directory named "-" would show."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(data, "load_model", refuse)
    monkeypatch.setattr(tiny, "make_pair", refuse)
    monkeypatch.chdir(tmp_path)


def run_args(ckpt, *extra):
    """`run` on the tiny pair (4 layers: the default preset's 16 would be the first error)."""
    return ["--quiet", "run", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--image", ckpt["image"],
            "--prompt", "what is 2 + 2 ?", "--layers", "3", *extra]


def one_line_error(capsys, argv):
    """The exit status and the whole of stderr, which must be one line."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refuses an option's value
        code = e.code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err.strip()


COUNTS = [
    (["passk", "--demo", "--out", "o"], "--max-new-tokens", "0"),
    (["passk", "--demo", "--out", "o"], "--samples", "0"),
    (["passk", "--demo", "--out", "o"], "--k", "0"),
    (["passk", "--demo", "--out", "o"], "--steps", "-1"),
    (["ablate", "--demo"], "--max-new-tokens", "0"),
    (["analyze", "--demo", "--out", "o"], "--limit", "0"),
    (["analyze", "--demo", "--out", "o"], "--limit", "-2"),
    (["analyze", "--demo", "--out", "o"], "--layers", "0"),
    (["demo"], "--max-new-tokens", "0"),
    (["demo"], "--steps", "0"),
    ("run", "--max-new-tokens", "0"),
    ("run", "--steps", "0"),
]


@pytest.mark.parametrize("argv, option, value", COUNTS, ids=lambda x: x if isinstance(x, str) else x[0])
def test_a_count_below_one_is_refused_by_name_before_any_model(ckpt, capsys, no_models, argv, option, value):
    argv = run_args(ckpt) if argv == "run" else ["--quiet", *argv]
    code, err = one_line_error(capsys, [*argv, option, value])
    assert code == 2 and err == f"actreplay {argv[1]}: error: argument {option}: expected an int >= 1, got '{value}'"


def test_a_layer_count_below_one_is_refused_by_name(ckpt, capsys, no_models):
    code, err = one_line_error(capsys, run_args(ckpt, "--layers", "0"))
    assert code == 2 and err == ("actreplay run: error: argument --layers: expected a count like 16 or a list like "
                                 "0,2,4, got '0'")


def test_count_defaults_apply_only_when_the_option_is_absent(tmp_path):
    parser = cli.build_parser()
    args = parser.parse_args(["passk", "--demo", "--out", str(tmp_path)])
    passk.validate(args)
    assert (args.max_new_tokens, args.samples, args.k) == (6, 4, [1, 4])
    args = parser.parse_args(["passk", "--demo", "--out", str(tmp_path), "--max-new-tokens", "1", "--samples", "1"])
    passk.validate(args)
    assert (args.max_new_tokens, args.samples, args.k) == (1, 1, [1])


def test_json_dash_is_the_standard_output_and_the_answers_go_to_stderr(ckpt, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(run_args(ckpt, *FAST, "--json", "-")) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert record["answers"]["with_replay"] in captured.err and "without replay:" in captured.err
    assert len(record["losses"]) == 2 and os.listdir(tmp_path) == []  # no file named "-"


@pytest.mark.parametrize("argv, option", [
    ("run", "--save-offsets"),
    ("run", "--save-targets"),
    (["passk", "--demo", "--out"], "--out"),
    (["passk", "--demo", "--out", "o", "--save-offsets"], "--save-offsets"),
    (["ablate", "--demo", "--out"], "--out"),
    (["analyze", "--demo", "--out"], "--out"),
], ids=lambda x: x if isinstance(x, str) else x[0])
def test_dash_is_refused_where_it_cannot_be_the_standard_output(ckpt, capsys, no_models, tmp_path, argv, option):
    argv = [*run_args(ckpt), option] if argv == "run" else ["--quiet", *argv]
    code, err = one_line_error(capsys, [*argv, "-"])
    assert code == 2 and err.startswith(f"actreplay {argv[1]}: error: {option}: '-' would be the standard output"), err
    assert "-" not in os.listdir(tmp_path)


@pytest.mark.parametrize("option, stage", [("--save-offsets", "optimize"), ("--save-targets", "compute_targets"),
                                           ("--json", "optimize")])
def test_a_save_that_fails_is_one_line_naming_the_option(ckpt, capsys, tmp_path, monkeypatch, option, stage):
    """The directory exists when the options are checked and is gone when the
    file is written (a full disk, a cleaned scratch space): one line, exit 2."""
    gone = tmp_path / "gone"
    gone.mkdir()
    path = gone / "out.file"
    original = getattr(ar, stage)

    def then_remove_the_directory(*args, **kwargs):
        out = original(*args, **kwargs)
        shutil.rmtree(gone)
        return out

    monkeypatch.setattr(ar, stage, then_remove_the_directory)
    code, err = one_line_error(capsys, run_args(ckpt, *FAST, option, str(path)))
    assert code == 2 and err == (f"actreplay run: error: {option}: cannot write '{path}' (No such file or "
                                 "directory)"), err


def test_two_outputs_naming_one_file_are_refused(ckpt, capsys, no_models, tmp_path):
    (tmp_path / "link.json").symlink_to(tmp_path / "out.json")
    code, err = one_line_error(capsys, run_args(ckpt, "--save-offsets", "out.json", "--json", "link.json"))
    assert code == 2 and err == ("actreplay run: error: --json: 'link.json' is the file --save-offsets writes too; "
                                 "give each output its own file")


def test_save_targets_with_targets_is_refused(ckpt, capsys, tmp_path, monkeypatch):
    """--targets skips the base pass: --save-targets once saved nothing, silently."""
    targets = tmp_path / "t.safetensors"
    assert cli.main(run_args(ckpt, *FAST, "--save-targets", str(targets))) == 0
    capsys.readouterr()
    monkeypatch.setattr(data, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["--quiet", "run", "--rlvr", ckpt["rlvr"], "--image", ckpt["image"], "--prompt", "what is 2 + 2 ?",
            "--targets", str(targets), "--save-targets", str(tmp_path / "again.safetensors")]
    code, err = one_line_error(capsys, argv)
    assert code == 2 and err.startswith("actreplay run: error: --save-targets: with --targets ") and \
        "no new targets to save" in err, err


@pytest.mark.parametrize("entry, message", [
    ({"baseline": "false"}, "'baseline' must be true or false (a JSON boolean), got 'false'"),
    ({"baseline": "true"}, "'baseline' must be true or false (a JSON boolean), got 'true'"),
    ({"baseline": 1}, "'baseline' must be true or false (a JSON boolean), got 1"),
    ({"baseline": None, "layers": 3}, "'baseline' must be true or false (a JSON boolean), got None"),
    ({"baseline": True, "layers": 3}, "'baseline': true generates without replay, so 'layers' would be ignored"),
    ({"preset": "", "layers": 3}, "unknown preset ''"),
    ({"preset": 7}, "'preset' must be a preset's name (a string), got 7"),
], ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_an_ablation_entry_says_exactly_what_it_means(ckpt, capsys, no_models, tmp_path, entry, message):
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps([{"name": "c", **entry}]))
    code, err = one_line_error(capsys, ["--quiet", "ablate", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--data",
                                        ckpt["rows"], "--configs", str(configs)])
    assert code == 2 and err.startswith(f"actreplay ablate: error: --configs {configs}[0] (c): ") and message in err, \
        err


def test_an_ablation_entry_with_baseline_false_replays():
    a = ablate.parse_spec({"name": "r", "baseline": False, "layers": 3, "lr": 0.005}, "x")
    assert a.config is not None and a.config.layers == 3 and a.config.lr == 0.005
    assert ablate.parse_spec({"name": "b", "baseline": True}, "x").config is None


def test_an_output_that_names_an_input_is_refused(ckpt, capsys, no_models, tmp_path):
    """`--json c.png` once replaced the image with JSON, and `--save-offsets` over
    `--targets` replaced the targets with a result."""
    image = tmp_path / "c.png"
    shutil.copy(ckpt["image"], image)
    before = image.read_bytes()
    argv = ["--quiet", "run", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"], "--image", str(image),
            "--prompt", "q", "--layers", "3"]
    code, err = one_line_error(capsys, argv + ["--json", str(image)])
    assert code == 2 and err == f"actreplay run: error: --json: {str(image)!r} is the file --image {str(image)!r} " \
                                "reads; give the output its own file", err
    (tmp_path / "img-link.png").symlink_to(image)  # through a link too
    code, err = one_line_error(capsys, argv + ["--save-offsets", str(tmp_path / "img-link.png")])
    assert code == 2 and "is the file --image" in err
    assert image.read_bytes() == before
    targets = tmp_path / "t.safetensors"
    targets.write_bytes(b"not read: the check comes first")
    code, err = one_line_error(capsys, ["--quiet", "run", "--rlvr", ckpt["rlvr"], "--image", str(image), "--prompt",
                                        "q", "--targets", str(targets), "--save-offsets", str(targets)])
    assert code == 2 and "is the file --targets" in err
    assert targets.read_bytes() == b"not read: the check comes first"


def test_a_learning_rate_that_overflows_is_one_line(capsys):
    """A loss that overflows (FloatingPointError) is the user's to fix: one line, exit 2, not a traceback."""
    code, err = one_line_error(capsys, ["--quiet", "demo", "--steps", "1", "--lr", "1e39"])
    assert code == 2 and err.startswith("actreplay demo: error: actreplay_ext: the offsets are not finite"), err


def test_an_infinite_temperature_is_refused(ckpt, capsys, no_models, tmp_path):
    code, err = one_line_error(capsys, ["--quiet", "passk", "--base", ckpt["base"], "--rlvr", ckpt["rlvr"],
                                        "--data", ckpt["rows"], "--out", str(tmp_path / "o"), "--temperature",
                                        "inf"])
    assert code == 2 and "--temperature must be a finite number > 0" in err, err


def test_the_prompt_files_are_part_of_a_checkpoints_identity(ckpt, tmp_path):
    """A changed chat template changes every prompt: passk resumed into an earlier
    template's samples."""
    from actreplay_ext.tools import checks
    copy = tmp_path / "rlvr"
    shutil.copytree(ckpt["rlvr"], copy)
    before = checks.checkpoint_identity(str(copy))
    template = next((p for p in copy.iterdir() if p.name.startswith("chat_template")), None) or \
        copy / "tokenizer_config.json"
    template.write_text(template.read_text() + "\n")
    after = checks.checkpoint_identity(str(copy))
    assert before["prompt_files_sha256"] != after["prompt_files_sha256"]
    assert {k: v for k, v in before.items() if k != "prompt_files_sha256"} == \
        {k: v for k, v in after.items() if k != "prompt_files_sha256"}
