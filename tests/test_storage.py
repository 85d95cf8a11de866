"""LocalStorage: atomic writes, key validation (path traversal), prefixes, derived keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.learning import storage as storage_mod
from workers.learning.storage import (
    DerivedPaths,
    LocalStorage,
    Storage,
    content_hash,
    normalize_key,
    storage_from_env,
)

HASH = content_hash(b"x")


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


def test_write_then_read_round_trips_and_creates_directories(store: LocalStorage) -> None:
    store.write("a/b/c.bin", b"\x00\x01data")
    assert store.read("a/b/c.bin") == b"\x00\x01data"
    assert store.exists("a/b/c.bin")
    assert store.path("a/b/c.bin") == store.root / "a" / "b" / "c.bin"


def test_local_storage_satisfies_the_storage_protocol(store: LocalStorage) -> None:
    assert isinstance(store, Storage)


def test_missing_key_reads_as_file_not_found(store: LocalStorage) -> None:
    assert not store.exists("nope.txt")
    with pytest.raises(FileNotFoundError):
        store.read("nope.txt")


def test_overwrite_replaces_whole_object_and_leaves_no_temp_files(store: LocalStorage) -> None:
    store.write("k", b"old" * 1000)
    store.write("k", b"new")
    assert store.read("k") == b"new"
    assert [p.name for p in store.root.iterdir()] == ["k"]


def test_failed_write_keeps_old_content_and_cleans_up(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("k", b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(storage_mod.os, "replace", boom)
    with pytest.raises(OSError):
        store.write("k", b"new")
    assert store.read("k") == b"old"
    assert [p.name for p in store.root.iterdir()] == ["k"]


@pytest.mark.parametrize(
    "key",
    ["/etc/passwd", "../x", "a/../../b", "a/..", "..", "a\\..\\b", "", ".", "C:/x", "a\x00b"],
)
def test_path_traversal_and_absolute_keys_are_rejected(store: LocalStorage, key: str) -> None:
    with pytest.raises(ValueError):
        store.write(key, b"x")
    with pytest.raises(ValueError):
        store.read(key)
    with pytest.raises(ValueError):
        store.exists(key)


def test_traversal_error_message_names_the_problem() -> None:
    with pytest.raises(ValueError, match="path traversal"):
        normalize_key("derived/../../etc/passwd")
    with pytest.raises(ValueError, match="absolute"):
        normalize_key("/etc/passwd")


def test_symlink_out_of_root_is_rejected(store: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store.root.mkdir(parents=True)
    (store.root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        store.write("link/evil.txt", b"x")
    assert not (outside / "evil.txt").exists()


def test_redundant_separators_normalise_to_one_key(store: LocalStorage) -> None:
    store.write("a//b/./c", b"1")
    assert normalize_key("a//b/./c") == "a/b/c"
    assert store.read("a/b/c") == b"1"


def test_delete_prefix_removes_a_directory_of_derivatives(store: LocalStorage) -> None:
    paths = DerivedPaths(HASH)
    store.write(paths.page(1), b"1")
    store.write(paths.page(2), b"2")
    store.write(paths.page_keys, b"{}")
    store.write("derived/other/page-001.png", b"keep")
    assert store.delete_prefix(paths.prefix) == 3
    assert not store.exists(paths.page(1))
    assert store.exists("derived/other/page-001.png")


def test_delete_prefix_matches_name_prefixes_like_an_object_store(store: LocalStorage) -> None:
    store.write("d/page-001.png", b"1")
    store.write("d/page-002.png", b"2")
    store.write("d/stitched.png", b"s")
    assert store.delete_prefix("d/page-") == 2
    assert store.exists("d/stitched.png")
    assert store.delete_prefix("missing/") == 0


def test_delete_prefix_refuses_to_wipe_everything(store: LocalStorage) -> None:
    for prefix in ("", "/", "..", "."):
        with pytest.raises(ValueError):
            store.delete_prefix(prefix)


def test_storage_from_env_uses_storage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_DIR", str(tmp_path / "s"))
    assert storage_from_env().root == (tmp_path / "s").absolute()


def test_storage_from_env_defaults_under_dot_jobvisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage_from_env().root == Path(os.getcwd()) / ".jobvisor" / "storage"


def test_content_hash_is_sha256_hex() -> None:
    assert content_hash(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_derived_paths_layout() -> None:
    paths = DerivedPaths(HASH)
    assert paths.page(7) == f"derived/{HASH}/page-007.png"
    assert paths.stitched == f"derived/{HASH}/stitched.png"
    assert paths.page_keys == f"derived/{HASH}/page_keys.json"
    assert paths.text_layer == f"derived/{HASH}/text_layer.json"
    assert paths.ocr("deu+eng", 300) == f"derived/{HASH}/ocr-deu+eng-300.json"
    with pytest.raises(ValueError):
        paths.page(0)


@pytest.mark.parametrize("bad", ["../../etc", "abc", HASH.upper(), HASH + "/x"])
def test_derived_paths_accept_only_sha256_hex(bad: str) -> None:
    with pytest.raises(ValueError):
        DerivedPaths(bad)
