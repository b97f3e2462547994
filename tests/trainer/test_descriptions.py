"""Description files for TGP-T: what a good TSV gives, and the clear errors a bad one gets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trainer.data import DataError, Sample
from trainer.descriptions import descriptions_for, read_descriptions


def _samples(root: Path) -> list[Sample]:
    return [Sample(root / "img" / "red" / "0.png", 0, "red"), Sample(root / "img" / "blue" / "1.png", 1, "blue")]


def _write(root: Path, text: str) -> Path:
    path = root / "descriptions.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_descriptions_are_matched_to_images_by_path_relative_to_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "img/red/0.png\ta red square.\tred\n\nimg/blue/1.png\ta blue square.\n")
    assert descriptions_for(_samples(tmp_path), read_descriptions(path)) == ["a red square.", "a blue square."]


def test_an_image_without_a_description_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "img/red/0.png\ta red square.\n")
    with pytest.raises(DataError, match=r"image .*blue/1.png has no description.*--allow-missing-descriptions"):
        descriptions_for(_samples(tmp_path), read_descriptions(path))


def test_allowed_missing_descriptions_become_none_and_are_logged(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path, "img/red/0.png\ta red square.\n")
    with caplog.at_level(logging.WARNING):
        assert descriptions_for(_samples(tmp_path), read_descriptions(path), allow_missing=True) == [
            "a red square.", None]
    assert "without the content loss" in caplog.text and "blue/1.png" in caplog.text


@pytest.mark.parametrize(("text", "message"), [
    ("img/red/0.png a red square.\n", r"descriptions.tsv:1: expected 'relative/path<TAB>description"),
    ("img/red/0.png\ta\tred\textra\n", r"descriptions.tsv:1: .*got 4 tab-separated fields"),
    ("img/red/0.png\t  \n", r"descriptions.tsv:1: the image path and the description must both be non-empty"),
    ("img/red/0.png\ta.\nimg/red/0.png\tb.\n", r"descriptions.tsv:2: image 'img/red/0.png' is described twice"),
    ("\n\n", r"descriptions.tsv: the descriptions file has no lines"),
    ("img/red/0.png\t" + "x" * 2001 + "\n", r"longer than 2000 characters"),
])
def test_malformed_lines_are_refused_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_descriptions(_write(tmp_path, text))


def test_a_class_column_that_disagrees_with_the_dataset_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "img/red/0.png\ta red square.\tblue\nimg/blue/1.png\ta blue square.\n")
    with pytest.raises(DataError, match=r"red/0.png: the descriptions file says class 'blue', the dataset 'red'"):
        descriptions_for(_samples(tmp_path), read_descriptions(path))


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.tsv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="bad.tsv: cannot read the descriptions file"):
        read_descriptions(tmp_path / "bad.tsv")
    with pytest.raises(DataError, match="missing.tsv: cannot read"):
        read_descriptions(tmp_path / "missing.tsv")
