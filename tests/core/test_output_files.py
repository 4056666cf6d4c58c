"""What the package writes never damages what is there: every output (the
result and targets files, the tools' JSON and text) goes through
`core.files.open_output`, which follows a symlink to the file it names, writes
a FIFO or a device node in place instead of renaming a file over it, honours
the umask, keeps a replaced file's mode, and leaves the old file whole and no
temporary file behind when the write is interrupted. No test touches /dev: a
FIFO in tmp_path stands for the special files, and a faked os.stat for a
device node."""

import os
import stat
import threading

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext.core import files
from actreplay_ext.tools import console


def _result():
    return ar.ReplayResult(deltas=torch.arange(12.0).reshape(3, 4), losses=[2.0, 1.0], selected=[2], n_visual=[3],
                           timings={"loop": 0.1}, input_ids=torch.tensor([[1, 7, 7, 7, 2]]))


def _targets():
    return ar.ReplayTargets(input_ids=torch.tensor([[1, 7, 7, 2]]), n_visual=[2], entropy=torch.zeros(1, 2),
                            selected=[torch.tensor([0])], target_idx=[torch.tensor([[3, 1]])],
                            target_logp=[torch.tensor([[0.5, 0.5]]).log()], config={"topv": 2, "layers": 1})


class Writer:
    """One of the package's outputs: `write(path)`, and `check(path)` that the file holds what it wrote."""

    def __init__(self, name, write, read, expected):
        self.name, self.write, self.read, self.expected = name, write, read, expected

    def check(self, path):
        assert self.read(str(path)) == self.expected, f"{self.name}: {path} does not hold what was written"

    def __repr__(self):
        return self.name


WRITERS = [
    Writer("ReplayResult.save", lambda p: _result().save(str(p)),
           lambda p: ar.ReplayResult.load(p).deltas.tolist(), _result().deltas.tolist()),
    Writer("ReplayTargets.save", lambda p: _targets().save(str(p)),
           lambda p: ar.ReplayTargets.load(p).target_idx[0].tolist(), [[3, 1]]),
    Writer("console.write_text", lambda p: console.write_text(str(p), "the table\n"),
           lambda p: open(p).read(), "the table\n"),
    Writer("console.write_json", lambda p: console.write_json(str(p), {"answer": 4}),
           lambda p: open(p).read(), '{\n "answer": 4\n}\n'),
]


@pytest.fixture
def umask():
    """Set the umask for one test, and put it back."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
def test_a_symlink_is_followed_and_stays_a_link(writer, tmp_path):
    (tmp_path / "data").mkdir()
    real = tmp_path / "data" / "real.out"
    real.write_text("old")
    link = tmp_path / "link.out"
    link.symlink_to(real)
    writer.write(link)
    assert link.is_symlink() and os.readlink(link) == str(real), "the link was replaced by a file"
    writer.check(real)
    assert sorted(os.listdir(tmp_path)) == ["data", "link.out"] and os.listdir(tmp_path / "data") == ["real.out"]


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
def test_a_fifo_is_written_in_place_and_stays_a_fifo(writer, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    os.link(fifo, tmp_path / "pipe.keep")  # another name for it: a reader left waiting can be released
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    try:
        writer.write(fifo)
        reader.join(timeout=30)
        assert not reader.is_alive(), "nothing was written into the FIFO (it was renamed over)"
    finally:
        if reader.is_alive():  # open the write end once, so the reader sees the end of the pipe
            os.close(os.open(tmp_path / "pipe.keep", os.O_WRONLY | os.O_NONBLOCK))
            reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a file"
    (tmp_path / "got").write_bytes(received[0])
    writer.check(tmp_path / "got")
    assert sorted(os.listdir(tmp_path)) == ["got", "pipe", "pipe.keep"]


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
def test_a_device_node_is_written_in_place_not_renamed_over(writer, tmp_path, monkeypatch):
    """os.stat says "character device" for an empty file in tmp_path (never a
    real /dev node): the write must reach that very inode."""
    node = tmp_path / "device"
    node.write_bytes(b"")
    inode = os.stat(node).st_ino
    real_stat = os.stat

    def as_a_device(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        if os.fspath(path) in (str(node), os.path.realpath(node)):
            return os.stat_result((stat.S_IFCHR | 0o666, *tuple(st)[1:]))
        return st

    monkeypatch.setattr(os, "stat", as_a_device)
    writer.write(node)
    monkeypatch.undo()
    assert os.stat(node).st_ino == inode, "the device node was renamed over"
    writer.check(node)
    assert os.listdir(tmp_path) == ["device"]


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)], ids=["umask022", "umask077"])
def test_new_files_honour_the_umask(writer, tmp_path, umask, mask, mode):
    umask(mask)
    writer.write(tmp_path / "new.out")
    assert stat.S_IMODE(os.stat(tmp_path / "new.out").st_mode) == mode
    writer.check(tmp_path / "new.out")


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
def test_a_replaced_file_keeps_its_mode(writer, tmp_path, umask):
    path = tmp_path / "shared.out"
    path.write_text("old")
    os.chmod(path, 0o640)
    writer.write(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    writer.check(path)


@pytest.mark.parametrize("writer", WRITERS, ids=repr)
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_file(writer, tmp_path, monkeypatch):
    """Ctrl-C after the new bytes are written, before they are in place."""
    path = tmp_path / "old.out"
    path.write_text("the old file")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.write(path)
    assert path.read_text() == "the old file" and os.listdir(tmp_path) == ["old.out"]


def test_an_exception_in_the_middle_of_a_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "old.out"
    path.write_text("the old file")
    for error in (KeyboardInterrupt, OSError):
        with pytest.raises(error), files.open_output(str(path)) as f:
            f.write(b"half of the new")
            raise error
        assert path.read_text() == "the old file" and os.listdir(tmp_path) == ["old.out"]


def test_a_path_through_an_open_descriptor_is_written_in_place(tmp_path):
    """`--json /dev/stdout > out.json`: /dev/stdout is a link to /proc/self/fd/1;
    here a link in tmp_path to /proc/self/fd/N of a file this test holds open.
    Renamed over, the holder would write on into a file with no name."""
    held = tmp_path / "held.out"
    fd = os.open(held, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"printed before; ")
        (tmp_path / "stdout").symlink_to(f"/proc/self/fd/{fd}")
        console.write_text(str(tmp_path / "stdout"), "the json")
        assert os.fstat(fd).st_nlink == 1 and os.fstat(fd).st_ino == os.stat(held).st_ino, \
            "the held file was renamed over"
    finally:
        os.close(fd)
    assert held.read_text() == "printed before; the json"


def test_a_directory_is_an_error_and_stays(tmp_path):
    with pytest.raises(IsADirectoryError):
        files.write_text(str(tmp_path), "x")
    assert tmp_path.is_dir() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("path", ["", "out/"])
def test_a_path_that_names_no_file_is_refused(tmp_path, monkeypatch, path):
    """'out/' once wrote a file named out (realpath drops the slash); '' wrote its
    temporary file in the parent directory."""
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path.parent))
    with pytest.raises(IsADirectoryError, match="argument 'path' must name a file"):
        _result().save(path)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(tmp_path.parent))) == before
