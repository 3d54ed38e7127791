"""Name sanitising, atomic writes and refusing unsafe pickles."""
from __future__ import annotations

import collections
import pickle

import pytest
import torch

from facebooth.utils import files


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "..", "", "   "])
def test_names_with_paths_or_empty_are_refused(bad):
    with pytest.raises(files.BadNameError):
        files.sanitize_name(bad)


def test_names_are_cleaned():
    assert files.sanitize_name("Anna Smith.safetensors") == "Anna Smith"
    assert files.sanitize_name("an:na*?") == "an_na_"
    assert len(files.sanitize_name("x" * 500)) == 120


def test_atomic_save_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"
    import safetensors.torch

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        files.atomic_save_safetensors({"a": torch.zeros(2)}, target)
    assert list(tmp_path.iterdir()) == []


def test_atomic_save_round_trip_with_metadata(tmp_path):
    p = files.atomic_save_safetensors({"a": torch.arange(3.0)}, tmp_path / "x.safetensors", {"method": "test", "n": 3})
    sd, meta = files.load_state_dict_file(p)
    assert meta == {"method": "test", "n": "3"}
    torch.testing.assert_close(sd["a"], torch.arange(3.0))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "obj": Evil()}, p)
    with pytest.raises(files.UnsafeFileError, match="weights-only"):
        files.load_state_dict_file(p)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(files.UnsafeFileError):
        files.load_state_dict_file(raw)


def test_plain_state_dict_pickle_loads(tmp_path):
    p = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2)}, p)
    sd, meta = files.load_state_dict_file(p)
    assert meta == {} and torch.equal(sd["w"], torch.ones(2))
