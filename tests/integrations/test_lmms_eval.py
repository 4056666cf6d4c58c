"""The lmms-eval model `actreplay` (the `lmms` extra): a local task evaluated
end to end through `python -m lmms_eval` on tiny checkpoints saved to disk,
with and without the replay in one run and data parallel over two processes;
and `generate_until` called directly on hand-made requests (two images, a
video, a batch). lmms-eval 0.7 exits 0 even when its evaluation fails, so
every end-to-end test reads the results file, never the exit code alone."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval", reason="the lmms extra: pip install 'actreplay_ext[lmms]'")
pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

import actreplay_ext as ar
from actreplay_ext import tiny
from actreplay_ext.integrations import lmms_eval as plugin
from actreplay_ext.tools import data
from actreplay_ext.tools.console import UsageError

TASK_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lmms_task")
TASK, BASELINE = "actreplay_tiny_vqa", "actreplay_tiny_vqa_baseline"
REPLAY = dict(layers=3, lr=0.005, steps=5)  # the tiny pair's settings (the demo's)
# offline: no download-count pings; PYTHONSAFEPATH: import the installed package, not the source tree
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONSAFEPATH": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_pair")
    return tiny.save_pair(str(root))


class Here:
    """The pair loaded in this process: what plain HF generation and
    actreplay_ext.patch answer, to compare with what lmms-eval recorded."""

    def __init__(self, pair):
        base_path, rlvr_path = pair
        self.base = data.load_model(base_path, dtype="float32", device_map=None)
        self.rlvr = data.load_model(rlvr_path, dtype="float32", device_map=None)
        self.processor = data.load_processor(rlvr_path)

    def answer(self, question, images, replay: bool) -> str:
        inputs = data.encode(self.processor, data.Row(id="x", question=question, images=images))
        greedy = dict(max_new_tokens=4, do_sample=False)
        if replay:
            with ar.patch(self.rlvr, base=self.base, config=ar.ReplayConfig.preset("mm-eureka-7b", **REPLAY)):
                out = self.rlvr.generate(**inputs, **greedy)
        else:
            out = self.rlvr.generate(**inputs, **greedy)
        return data.decode_new(self.processor, out, inputs["input_ids"].shape[1])[0]


@pytest.fixture(scope="module")
def task_dir(pair, tmp_path_factory):
    """The task's YAML and utils copied beside 4 generated docs (1 or 2 noise
    images each). Docs 0 and 1 are answered by what the RLVR model says alone,
    2 and 3 by what it says with the replay (as generated here), so the two
    scores are known: each doc's record says both answers."""
    from PIL import Image

    root = tmp_path_factory.mktemp("lmms_task")
    shutil.copytree(TASK_FILES, root, dirs_exist_ok=True)
    here = Here(pair)
    rng = torch.Generator().manual_seed(0)
    docs = []
    for i in range(4):
        images = []
        for j in range(1 + i % 2):
            name = f"doc{i}_{j}.png"
            pixels = (torch.rand(28 * (2 + j), 28 * (3 - j), 3, generator=rng) * 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name)
            images.append(name)
        question = f"what is shown in picture {i}"
        paths = [str(root / n) for n in images]
        said = {mode: here.answer(question, paths, replay=mode == "replay") for mode in ("baseline", "replay")}
        docs.append({"id": i, "question": question, "images": images, "said": said,
                     "answer": said["baseline" if i < 2 else "replay"]})
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root, docs


def model_args(pair, **extra):
    base, rlvr = pair
    args = {"base": base, "rlvr": rlvr, **REPLAY, **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


def evaluate(task_dir, out, args, tasks=(TASK, BASELINE), nproc=None, extra=()):
    """One `python -m lmms_eval` run; its results file (and samples) read back."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    cmd = launcher + ["-m", "lmms_eval", "--model", "actreplay", "--model_args", args, "--tasks", ",".join(tasks),
                      "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out),
                      "--log_samples", "--timezone", "UTC", *extra]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=str(out.parent))
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert proc.returncode == 0 and len(found) == 1, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(found[0]) as f:
        results = json.load(f)
    samples = {}
    for task in tasks:
        (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        with open(path) as f:
            samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    return results, samples


def answer_of(sample) -> str:
    resp = sample["filtered_resps"]
    return resp[0] if isinstance(resp, list) else resp


@pytest.fixture(scope="module")
def one_run(pair, task_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_run")
    offsets = root / "offsets"
    results, samples = evaluate(task_dir[0], root / "out", model_args(pair, save_offsets=offsets))
    return results, samples, offsets


def test_one_run_scores_the_replay_and_the_baseline(one_run, task_dir):
    results, samples, offsets = one_run
    _, docs = task_dir
    # what lmms-eval recorded is what this process generates, without and with the replay
    for task, mode in ((BASELINE, "baseline"), (TASK, "replay")):
        assert {d: answer_of(s) for d, s in samples[task].items()} == {i: doc["said"][mode]
                                                                       for i, doc in enumerate(docs)}, mode
        expected = sum(doc["said"][mode] == doc["answer"] for doc in docs) / 4
        assert results["results"][task]["exact_match,none"] == pytest.approx(expected) and expected >= 0.5
        assert results["n-samples"][task]["effective"] == 4
    assert any(doc["said"]["baseline"] != doc["said"]["replay"] for doc in docs)  # the replay changed answers
    # the replay ran on every request of the replay task, and only there
    log = [json.loads(line) for line in (offsets / "replay.rank0.jsonl").read_text().splitlines()]
    replayed = {e["doc_id"]: e for e in log if e["task"] == TASK}
    assert sorted(replayed) == [0, 1, 2, 3] and all(e["replay"] for e in replayed.values())
    for e in replayed.values():
        losses = e["batch_losses"]  # batch_size 1: the request's own
        assert len(losses) == REPLAY["steps"] and sum(e["batch_selected"]) > 0 and min(losses) < losses[0]
        assert ar.ReplayResult.load(e["offsets"]).losses == losses and e["n_visual"] > 0
    baseline = [e for e in log if e["task"] == BASELINE]
    assert len(baseline) == 4 and all(not e["replay"] and "batch_losses" not in e for e in baseline)


def test_data_parallel_over_two_processes_gives_the_same_answers(one_run, pair, task_dir, tmp_path):
    """Two ranks, 3 docs: rank 1 gets doc 1 and lmms-eval's padding copy of it,
    which is answered but not logged as a request."""
    _, samples, _ = one_run
    offsets = tmp_path / "offsets"
    dp_results, dp_samples = evaluate(task_dir[0], tmp_path / "out", model_args(pair, save_offsets=offsets), nproc=2,
                                      extra=["--limit", "3"])
    for task in (TASK, BASELINE):
        answers = {d: answer_of(s) for d, s in dp_samples[task].items()}
        assert answers == {d: answer_of(s) for d, s in samples[task].items() if d < 3}
        expected = sum(a == task_dir[1][d]["answer"] for d, a in answers.items()) / 3
        assert dp_results["results"][task]["exact_match,none"] == pytest.approx(expected)
    ranks = {r: [json.loads(line)["doc_id"] for line in (offsets / f"replay.rank{r}.jsonl").read_text().splitlines()
                 if json.loads(line)["task"] == TASK] for r in (0, 1)}
    assert sorted(ranks[0]) == [0, 2] and ranks[1] == [1]  # both ranks replayed, the padding copy not logged


# ------------------------------------------------- generate_until called directly


def request(doc_id, context, gen_kwargs, task="hand_made", split="test"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type="generate_until", idx=0,
                    arguments=(context, gen_kwargs, lambda doc: doc["visuals"], doc_id, task, split),
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1, "split": split})


def _write_video(path):
    av = pytest.importorskip("av", reason="the video extra (PyAV) decodes video files")
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=2)
        stream.height, stream.width = 56, 56
        stream.pix_fmt = "yuv420p"
        for _ in range(4):
            frame = av.VideoFrame.from_ndarray((rng.random((56, 56, 3)) * 255).astype("uint8"), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def direct_model(pair):
    return plugin.ActReplay(batch_size=2, **dict(zip(("base", "rlvr"), pair)), **REPLAY, device="cpu")


def test_generate_until_takes_two_images_a_video_and_batches(direct_model, task_dir, tmp_path):
    from PIL import Image

    model, task_dir = direct_model, task_dir[0]
    images = [Image.open(task_dir / "doc1_0.png"), Image.open(task_dir / "doc1_1.png")]
    video = tmp_path / "clip.mp4"
    _write_video(video)
    docs = [{"visuals": images}, {"visuals": [str(video)]}, {"visuals": [images[0]]}]
    model.task_dict = {"hand_made": {"test": docs}}
    greedy = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = [request(0, "<image><image> compare the pictures", greedy),
                request(1, "what happens in the video", greedy),
                request(2, "describe <image>", {**greedy, "replay": False})]
    model.results.clear()
    answers = model.generate_until(requests)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    by_doc = {e["doc_id"]: e for e in model.results}
    assert by_doc[0]["replay"] and by_doc[1]["replay"] and not by_doc[2]["replay"]
    assert by_doc[0]["batch_rows"] == by_doc[1]["batch_rows"] == 2  # one batch of 2
    assert by_doc[0]["batch_row"] == 0 and by_doc[1]["batch_row"] == 1
    n_image = sum(plugin.data.encode(model.processor, data.Row("i", "q", images=images))["image_grid_thw"]
                  .prod(-1).div(4).long().tolist())
    assert by_doc[0]["n_visual"] == n_image  # both images reached the prompt
    video_inputs = plugin.data.encode(model.processor, data.Row("v", "q", video=str(video)))
    assert by_doc[1]["n_visual"] == int(video_inputs["video_grid_thw"].prod(-1).sum()) // 4 > 0  # and the video
    # each answer is what that request alone gives: batching does not change it
    for i, req in enumerate(requests):
        assert model.generate_until([req]) == [answers[i]], i
    # the baseline request is plain HF generation on the same prompt
    rlvr = model.model
    row = data.Row("x", "describe", images=[images[0]])
    inputs = data.encode(model.processor, row)
    plain = data.decode_new(model.processor, rlvr.generate(**inputs, max_new_tokens=4, do_sample=False),
                            inputs["input_ids"].shape[1])[0]
    assert answers[2] == plain


def test_generation_kwargs_are_read_as_lmms_evals_qwen2_5_vl_reads_them():
    """temperature decides sampling (do_sample alone does not), the "\\n\\n" stop
    lmms-eval adds to every task without one is dropped (it once cut reasoning
    answers at their first paragraph), and a task without max_new_tokens gets
    32768 or the model arg, not 128."""
    gen, until, replay = plugin.generation_kwargs({"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9,
                                                   "until": "###", "do_sample": False}, True)
    assert gen == {"max_new_tokens": 7, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert until == ["###"] and replay is True
    gen, until, replay = plugin.generation_kwargs({"temperature": 0, "num_beams": 2, "replay": "false",
                                                   "do_sample": True, "until": ["\n\n", "</answer>"]}, True)
    assert gen == {"max_new_tokens": 32768, "do_sample": False, "num_beams": 2}
    assert until == ["</answer>"] and replay is False
    gen, until, _ = plugin.generation_kwargs({"until": ["\n\n"], "do_sample": False}, True, 512)
    assert gen == {"max_new_tokens": 512, "do_sample": False} and until == []
    assert plugin._cut("four\n\nfive###six", ["###"]) == "four\n\nfive"


def test_a_reasoning_answer_keeps_its_paragraphs(direct_model, monkeypatch):
    """What the model says after a blank line reaches the scorer."""
    model = direct_model
    model.task_dict = {"hand_made": {"test": [{"visuals": []}]}}
    monkeypatch.setattr(plugin.data, "decode_new", lambda *a: ["<think>one\n\ntwo</think><answer>6</answer>"])
    lmms_default = {"until": ["\n\n"], "do_sample": False, "max_new_tokens": 2}  # a task without `until`
    assert model.generate_until([request(0, "q", lmms_default)]) == ["<think>one\n\ntwo</think><answer>6</answer>"]


def test_padding_copies_are_not_recorded_and_save_offsets_is_not_reused(pair, tmp_path):
    """lmms-eval pads a short rank with copies of its last request
    (metadata __padding_only__): they are answered, not logged as requests. A
    save_offsets directory holding a rank's log of an earlier run is refused."""
    base, rlvr = pair
    model = plugin.ActReplay(base=base, rlvr=rlvr, **REPLAY, device="cpu", save_offsets=str(tmp_path / "o"))
    model.task_dict = {"t": {"test": [{"visuals": []}]}}
    real, pad = request(0, "q", {"max_new_tokens": 2}, task="t"), request(0, "q", {"max_new_tokens": 2}, task="t")
    pad.metadata = {**pad.metadata, "__padding_only__": True}
    assert len(model.generate_until([real, pad])) == 2
    lines = (tmp_path / "o" / "replay.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 1 and len(model.results) == 1
    with pytest.raises(UsageError, match="holds replay.rank0.jsonl of an earlier run"):
        plugin.ActReplay(base=base, rlvr=rlvr, **REPLAY, device="cpu", save_offsets=str(tmp_path / "o"))


def test_a_repeated_document_keeps_every_calls_offsets(pair, task_dir, tmp_path):
    """A task's `repeats` sends one document again: each generate call's offsets
    get their own file (one file per document kept only the last), and each
    log line names its call's file."""
    from PIL import Image

    base, rlvr = pair
    model = plugin.ActReplay(base=base, rlvr=rlvr, **REPLAY, device="cpu", save_offsets=str(tmp_path / "o"))
    model.task_dict = {"t": {"test": [{"visuals": [Image.open(task_dir[0] / "doc1_0.png")]}]}}
    again = [request(0, "q", {"max_new_tokens": 2}, task="t") for _ in range(3)]
    assert len(model.generate_until(again)) == 3  # batch_size 1: three calls
    log = [json.loads(line) for line in (tmp_path / "o" / "replay.rank0.jsonl").read_text().splitlines()]
    paths = [e["offsets"] for e in log]
    assert len(log) == 3 and len(set(paths)) == 3 and all(os.path.isfile(p) for p in paths)
    assert sorted(os.listdir(tmp_path / "o")) == sorted(["replay.rank0.jsonl", *map(os.path.basename, paths)])


def test_the_baseline_needs_neither_a_base_nor_a_fitting_replay_config(pair, tmp_path, monkeypatch):
    """replay=false with the default preset (16 layers) on the 4-layer model, and
    'None' (as lmms-eval passes it) meaning no value, not a directory named None."""
    monkeypatch.chdir(tmp_path)
    model = plugin.ActReplay(rlvr=pair[1], replay=False, base="None", save_offsets="None", device="cpu")
    assert model._base is None and model.save_offsets is None and not (tmp_path / "None").exists()


@pytest.mark.parametrize("args, message", [
    (dict(lr=0.01, layrs=3), "'layrs' is not an argument of this model"),
    (dict(base=None), "'base' is required to replay"),
    (dict(rlvr=None), "'rlvr' is required"),
    (dict(layers=9), "config.layers = 9 exceeds the 4 decoder layers"),
    (dict(layers="[0,9]"), r"config.layers = \(0, 9\) exceeds the 4 decoder layers"),
    (dict(optimizer="adam"), "'optimizer' must be one of"),
    (dict(preset="mm-eureka"), "'preset' must be one of"),
    (dict(replay="maybe"), "'replay' must be true or false"),
    (dict(base="/nonexistent/base"), "base: '/nonexistent/base' not found"),
    (dict(preset="deepeyes-7b", save_offsets="/tmp/x"), "'save_offsets' has nothing to save"),
    (dict(batch_size=0), "'batch_size' must be an int >= 1"),
    (dict(attn="flash"), "'attn' must be one of eager, sdpa, flash_attention_2"),
    (dict(dtype="fp16"), "'dtype' must be one of"),
    (dict(min_pixels=1000, max_pixels=10), r"'min_pixels' \(1000\) must be at most max_pixels"),
    (dict(max_new_tokens=0), "'max_new_tokens' must be a positive int"),
    (dict(processor="/nonexistent/processor"), "'processor' '/nonexistent/processor' is not a directory"),
])
def test_bad_model_args_fail_by_name_before_any_weight_loads(pair, monkeypatch, args, message):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(plugin.data, "load_model", refuse)
    given = {**dict(zip(("base", "rlvr"), pair)), **REPLAY, **args}
    given = {k: v for k, v in given.items() if v is not None}
    with pytest.raises((UsageError, ValueError), match=message):
        plugin.ActReplay(**given)


def test_model_args_as_lmms_eval_parses_them(pair):
    """lmms-eval turns '-1' into -1.0 and leaves 'None' and lists as text."""
    from lmms_eval.utils import simple_parse_args_string

    parsed = simple_parse_args_string("rlvr=r,base=b,layers=[1,3],steps=4.0,tol=None,normalize=false,lr=0.01")
    load, cfg = plugin.parse_model_args(parsed)
    assert cfg.layers == (1, 3) and cfg.steps == 4 and cfg.tol is None and cfg.normalize is False
    assert cfg.step_size == 0.01 and load["replay"] is True and load["preset"] == "mm-eureka-7b"
    _, cfg = plugin.parse_model_args(simple_parse_args_string("rlvr=r,base=b,optimizer=lbfgs"))
    assert cfg.step_size == ar.config.DEFAULT_LR["lbfgs"]  # the preset's lr is sgd's


def test_loglikelihood_says_it_is_unsupported(direct_model):
    with pytest.raises(NotImplementedError, match="loglikelihood is not supported"):
        direct_model.loglikelihood([request(0, "q", {})])


def test_the_entry_point_loads_from_the_repository_root(tmp_path):
    """`python -m lmms_eval --model actreplay` from a clone's root: the working directory's
    source tree (no _C) comes first; lmms-eval's entry point loads the installed package
    (once it logged a warning and said "Model 'actreplay' not found", exit 0)."""
    from helpers import installed_elsewhere, source_copy

    env = source_copy(tmp_path)
    site, no_editable = installed_elsewhere(tmp_path)
    env["PYTHONPATH"] = site
    code = no_editable + ("import importlib.metadata as m; ep = [e for e in m.entry_points(group='lmms_eval.models') "
                          "if e.name == 'actreplay'][0]; print(ep.load()); import actreplay_ext.integrations.lmms_eval "
                          "as p; print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has no compiled extension" in out.stderr and "using the installed package" in out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith(site)
