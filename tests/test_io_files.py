"""The rule for files read from a model folder: inside its root, regular files only (io/files.py)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from langmerge.errors import LangmergeError
from langmerge.io.files import cache_repository, is_regular_file, model_file, open_regular, symlink_root


def _snapshot(tmp_path):
    """A cache repository laid out as huggingface_hub writes it: a snapshot of relative symlinks into blobs/."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_bytes(b"weights")
    snap = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc123", snap / "model.safetensors")
    return repo, snap


def test_plain_folder_root_is_the_folder(tmp_path):
    assert symlink_root(tmp_path) == tmp_path.resolve()
    assert cache_repository(tmp_path) is None


def test_snapshot_root_is_its_cache_repository(tmp_path):
    repo, snap = _snapshot(tmp_path)
    assert cache_repository(snap) == repo.resolve()
    assert cache_repository(snap / "sub") == repo.resolve()  # a model in a sub-folder of a snapshot
    assert model_file(snap, "model.safetensors", what="w") == (repo / "blobs" / "abc123").resolve()


def test_snapshot_symlink_leaving_its_repository_is_refused(tmp_path):
    repo, snap = _snapshot(tmp_path)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "secret").write_text("x")
    os.symlink(other / "secret", snap / "config.json")
    with pytest.raises(LangmergeError, match="'config.json' points outside the model folder; refused"):
        model_file(snap, "config.json", what="'config.json'")


def test_plain_folder_symlink_outside_is_refused(tmp_path):
    (tmp_path / "secret").write_text("x")
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(tmp_path / "secret", folder / "tokenizer.json")
    with pytest.raises(LangmergeError, match="points outside the model folder"):
        model_file(folder, "tokenizer.json", what="tokenizer.json")
    with pytest.raises(LangmergeError, match="absolute path"):
        model_file(folder, str(tmp_path / "secret"), what="entry")
    os.symlink("sub/real", folder / "inner")  # a symlink inside the folder is fine
    (folder / "sub").mkdir()
    (folder / "sub" / "real").write_text("y")
    assert model_file(folder, "inner", what="inner") == (folder / "sub" / "real").resolve()


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    result: list[BaseException] = []

    def attempt():
        try:
            open_regular(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert isinstance(result[0], LangmergeError) and "a FIFO, not a regular file; refused" in str(result[0])
    assert not is_regular_file(fifo)


def test_socket_and_device_and_folder_are_refused(tmp_path):
    sock_path = tmp_path / "config.json"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        with pytest.raises(LangmergeError, match="config.json: cannot read"):
            open_regular(sock_path)  # the kernel refuses open() on a socket
        assert not is_regular_file(sock_path)
    finally:
        server.close()
    with pytest.raises(LangmergeError, match="a character device, not a regular file"):
        open_regular(type(tmp_path)("/dev/zero"))
    with pytest.raises(LangmergeError, match="a folder, not a regular file"):
        open_regular(tmp_path)


def test_regular_file_reads(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\x00\x01")
    with open_regular(path) as f:
        assert f.read() == b"\x00\x01"
    assert is_regular_file(path) and not is_regular_file(tmp_path / "missing")
