"""Where the lmms-eval model writes its offsets (`integrations.lmms_files`,
importable without lmms-eval): every generate call gets its own file. A task's
`repeats` sends the same document N times; the old name (task, split, doc ids,
rank) gave the N calls one file, each overwriting the last."""

import os

from actreplay_ext.integrations.lmms_files import log_file, offsets_file


def test_a_repeated_document_gets_a_file_per_generate_call(tmp_path):
    names = [offsets_file(str(tmp_path), "mathverse", "test", [7], 0, call) for call in range(4)]
    assert len(set(names)) == 4
    assert all(os.path.dirname(n) == str(tmp_path) and n.endswith(".safetensors") for n in names)
    assert os.path.basename(names[0]) == "mathverse-test-7.rank0.call0.safetensors"


def test_batches_ranks_and_odd_task_names_never_share_a_file(tmp_path):
    d = str(tmp_path)
    names = [
        offsets_file(d, "t", "test", [1, 1], 0, 0),  # a batch of two repeats of doc 1
        offsets_file(d, "t", "test", [1, 1], 0, 1),  # the next batch: the same documents
        offsets_file(d, "t", "test", [1, 1], 1, 0),  # the same on rank 1
        offsets_file(d, "a/b", "test", [1], 0, 2),
        offsets_file(d, "a_b", "test", [1], 0, 3),
    ]
    assert len(set(names)) == len(names)
    assert all("/" not in os.path.basename(n) for n in names)
    assert offsets_file(d, "a/b", "test", [1], 0, 0) != offsets_file(d, "a_b", "test", [1], 0, 0)


def test_each_rank_has_its_own_log(tmp_path):
    assert log_file(str(tmp_path), 0) != log_file(str(tmp_path), 1)
    assert os.path.basename(log_file(str(tmp_path), 3)) == "replay.rank3.jsonl"
