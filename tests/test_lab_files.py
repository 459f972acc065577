"""replace_atomically: a failed write leaves the old file, no temporary, and names the file."""

from __future__ import annotations

import errno

import pytest

from normdrop.lab.files import replace_atomically


def test_a_write_replaces_the_file(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    replace_atomically(path, lambda temporary: temporary.write_text("new"))
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_failed_write_keeps_the_old_file_and_names_it(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")

    def full_disk(temporary):
        temporary.write_text("half a pa")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() reports it

    with pytest.raises(OSError, match="No space left on device") as raised:
        replace_atomically(path, full_disk)
    assert raised.value.filename == str(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no .report.html.*.tmp
