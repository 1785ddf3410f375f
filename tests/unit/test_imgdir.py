"""imgdir.Staging: files created ahead (prepare) are handed out by create, the ones never asked for and a parent
link to another place are gone after the commit, and a failed iteration leaves nothing."""

from __future__ import annotations

import os

import pytest
from wpdump.images import imgdir


def test_files_created_ahead(tmp_path):
    st = imgdir.Staging(str(tmp_path / "1"))
    st.prepare(["a", "b", "unused"], "../0")
    fd = st.create("a")
    os.write(fd, b"A")
    st.keep(fd, "a")
    st.write_file("b", b"B")
    st.write_file("c", b"C")  # not prepared: created now
    st.symlink("../elsewhere")  # not the link prepared: replaced
    assert st.commit() == str(tmp_path / "1")
    assert sorted(os.listdir(tmp_path / "1")) == ["a", "b", "c", "parent"]
    assert os.readlink(tmp_path / "1" / "parent") == "../elsewhere"
    assert [(tmp_path / "1" / n).read_bytes() for n in "abc"] == [b"A", b"B", b"C"]
    assert os.stat(tmp_path / "1" / "a").st_mode & 0o777 == 0o600


def test_link_created_ahead_and_not_asked_for(tmp_path):
    st = imgdir.Staging(str(tmp_path / "2"))
    st.prepare(["x"], "../1")
    st.write_file("x", b"X")
    st.commit()
    assert os.listdir(tmp_path / "2") == ["x"]  # an iteration without a parent keeps no link


def test_failed_iteration_leaves_nothing(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(RuntimeError), imgdir.Staging(str(tmp_path / "images" / "3")) as st:
        st.prepare(["a", "b"], "../2")
        st.write_file("a", b"A")
        raise RuntimeError("the iteration failed")
    assert os.listdir(tmp_path / "images") == []
