from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import COLOURS, make_coop, make_csv, make_imagefolder, write_images
from trainer.data import DataError, load_coop, load_csv, load_dataset, load_imagefolder, open_image
from trainer.fewshot import base_novel_split, load_split, sample_few_shot, save_split

CLASSES = tuple(sorted(COLOURS))


def test_coop_layout_finds_split_file_and_images_in_subfolder(coop_root: Path) -> None:
    dataset = load_coop(coop_root)
    assert dataset.name == "colours"
    assert dataset.classnames == tuple(COLOURS)  # label order from the split file
    assert len(dataset.split("train")) == 8 * 4 and len(dataset.split("test")) == 6 * 4
    assert all(s.path.is_file() and dataset.classnames[s.label] == s.classname for s in dataset.split("test"))


def test_imagefolder_uses_split_folders_and_sorted_class_names(tmp_path: Path) -> None:
    dataset = load_imagefolder(make_imagefolder(tmp_path))
    assert dataset.classnames == CLASSES
    assert len(dataset.split("train")) == 24 and len(dataset.split("test")) == 12
    assert {s.classname for s in dataset.split("test") if s.label == 0} == {CLASSES[0]}


def test_csv_reads_paths_labels_and_splits(tmp_path: Path) -> None:
    dataset = load_dataset(make_csv(tmp_path), "csv")
    assert dataset.classnames == CLASSES
    assert len(dataset.split("train")) + len(dataset.split("test")) == 24
    assert all(s.path.is_file() for s in dataset.split("train"))


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split_zhou"):
        load_coop(tmp_path)
    with pytest.raises(DataError, match="nope.json"):
        load_coop(tmp_path, tmp_path / "nope.json")


def test_unknown_class_in_test_split_is_named(tmp_path: Path) -> None:
    root = make_coop(tmp_path, train=1, test=1)
    split = root / "split_zhou_colours.json"
    doc = json.loads(split.read_text())
    doc["test"][0][2] = "purple"
    split.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'purple'"):
        load_coop(root)


def test_imagefolder_test_class_missing_from_train_is_named(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path)
    shutil.copytree(root / "test" / "red", root / "test" / "purple")
    with pytest.raises(DataError, match="'purple'"):
        load_imagefolder(root)


def test_csv_without_label_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("file,class\na.png,red\n")
    with pytest.raises(DataError, match="bad.csv.*'label'"):
        load_csv(path)


def test_undecodable_image_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png.*does not decode"):
        open_image(broken)
    with pytest.raises(DataError, match="missing.png.*not found"):
        open_image(tmp_path / "missing.png")


def test_few_shot_is_seeded_per_class_and_saved(coop_dataset, coop_root: Path, tmp_path: Path) -> None:
    train = coop_dataset.split("train")
    first = sample_few_shot(train, 2, seed=3)
    assert first == sample_few_shot(list(reversed(train)), 2, seed=3)  # order of the input does not matter
    assert first != sample_few_shot(train, 2, seed=4)
    assert sorted(s.label for s in first) == [0, 0, 1, 1, 2, 2, 3, 3]
    save_split(tmp_path / "split.json", first, coop_dataset.classnames, shots=2, seed=3, root=coop_root)
    assert load_split(tmp_path / "split.json", coop_dataset.classnames, coop_root) == first


def test_a_saved_split_still_works_after_the_dataset_moves(coop_dataset, coop_root: Path, tmp_path: Path) -> None:
    import json
    import shutil

    chosen = sample_few_shot(coop_dataset.split("train"), 1, seed=0)
    save_split(tmp_path / "split.json", chosen, coop_dataset.classnames, shots=1, seed=0, root=coop_root)
    assert not any(Path(p).is_absolute() for p, _, _ in json.loads((tmp_path / "split.json").read_text())["train"])
    moved = shutil.copytree(coop_root, tmp_path / "moved")
    reloaded = load_split(tmp_path / "split.json", coop_dataset.classnames, moved)
    assert [s.path for s in reloaded] == [moved / s.path.relative_to(coop_root) for s in chosen]
    assert all(s.path.is_file() for s in reloaded)


def test_more_shots_than_images_names_the_class(coop_dataset) -> None:
    with pytest.raises(DataError, match="class 'red' has 8 training images but 9 shots"):
        sample_few_shot(coop_dataset.split("train"), 9, seed=0)


def test_base_novel_split_takes_first_half_rounded_up_and_relabels(coop_dataset) -> None:
    base, novel = base_novel_split(("a", "b", "c", "d", "e"))
    assert base.classnames == ("a", "b", "c") and novel.classnames == ("d", "e")
    base, novel = base_novel_split(coop_dataset.classnames)
    novel_samples = novel.select(coop_dataset.split("test"))
    assert {s.label for s in novel_samples} == {0, 1}
    assert {s.classname for s in novel_samples} == set(coop_dataset.classnames[2:])


def test_coop_imagenet_family_and_fgvc_aircraft_load_without_a_split_file(tmp_path: Path) -> None:
    names = "".join(f"{c} a {c} thing\n" for c in COLOURS)  # "<wnid> <name>": the colour is the folder id
    net, adversarial, v2, fgvc = (tmp_path / d for d in ("imagenet", "imagenet-adversarial", "imagenetv2", "fgvc"))
    write_images(net / "images" / "train", 3, 0)
    write_images(net / "images" / "val", 2, 1)
    write_images(adversarial / "imagenet-a", 1, 2, ["yellow", "green"])
    for i, colour in enumerate(COLOURS):  # ImageNet-V2 names its folders by label index
        write_images(v2 / "imagenetv2-matched-frequency-format-val", 1, 3, [colour])
        (v2 / "imagenetv2-matched-frequency-format-val" / colour).rename(v2 / "imagenetv2-matched-frequency-format-val"
                                                                         / str(i))
    for root in (net, adversarial, v2):
        (root / "classnames.txt").write_text(names)
    imagenet = load_dataset(net, "coop")
    assert imagenet.classnames == tuple(f"a {c} thing" for c in COLOURS)
    assert len(imagenet.split("train")) == 12 and len(imagenet.split("test")) == 8
    assert {s.path.parent.name for s in imagenet.split("test") if s.label == 1} == {"green"}
    assert load_dataset(adversarial, "coop").classnames == ("a green thing", "a yellow thing")  # classnames.txt order
    assert [s.classname for s in load_dataset(v2, "coop").split("test")] == [f"a {c} thing" for c in COLOURS]
    (fgvc / "images").mkdir(parents=True)
    (fgvc / "variants.txt").write_text("707-320\nA300B4\n")
    (fgvc / "images_variant_train.txt").write_text("0001 A300B4\n0002 707-320\n")
    (fgvc / "images_variant_test.txt").write_text("0003 707-320\n")
    aircraft = load_dataset(fgvc, "coop")
    assert aircraft.classnames == ("707-320", "A300B4")
    assert [(s.path.name, s.label) for s in aircraft.split("train")] == [("0001.jpg", 1), ("0002.jpg", 0)]
    (fgvc / "images_variant_val.txt").write_text("0004 A380\n")
    with pytest.raises(DataError, match="'A380' is not in variants.txt"):
        load_dataset(fgvc, "coop")
