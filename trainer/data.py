"""Datasets on disk: the CoOp layout (a split_zhou JSON, or CoOp's own forms of ImageNet and its variants and
FGVC-Aircraft), an ImageFolder tree, or a CSV of path,label.

Every loader returns a `Dataset`: sorted class names and train/val/test lists of `Sample`s whose labels
index those names. Problems are `DataError`s that name the file or class at fault and say what to do.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUTS = ("coop", "imagefolder", "csv")


class DataError(ValueError):
    """A dataset problem; the message names the file or class and how to fix it."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    classname: str


@dataclass(frozen=True)
class Dataset:
    """Class names (label i is `classnames[i]`) and the samples of each split."""

    name: str
    classnames: tuple[str, ...]
    splits: dict[str, list[Sample]] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        if not self.splits.get(name):
            available = [s for s in SPLITS if self.splits.get(s)]
            raise DataError(f"dataset {self.name!r} has no {name!r} samples; available splits: {available}")
        return self.splits[name]


def load_dataset(root: str | Path, layout: str, split_file: str | Path | None = None) -> Dataset:
    """Load `root` in the given layout ('coop', 'imagefolder' or 'csv')."""
    loaders = {"coop": load_coop, "imagefolder": load_imagefolder, "csv": load_csv}
    if layout not in loaders:
        raise DataError(f"unknown dataset layout {layout!r}; use one of {list(LAYOUTS)}")
    if layout == "coop":
        return load_coop(root, split_file)
    return loaders[layout](root)


# --- CoOp layout -------------------------------------------------------------------------------------


def find_split_file(root: Path) -> Path:
    """The one `split_zhou_*.json` in `root` (CoOp's benchmark layout)."""
    candidates = sorted(root.glob("split_zhou_*.json"))
    if not candidates:
        raise DataError(f"{root}: no split_zhou_*.json found; pass the CoOp dataset folder or --split-file")
    if len(candidates) > 1:
        raise DataError(f"{root}: several split files {[c.name for c in candidates]}; choose one with --split-file")
    return candidates[0]


def load_coop(root: str | Path, split_file: str | Path | None = None) -> Dataset:
    """CoOp's `split_zhou_<name>.json`: {"train"|"val"|"test": [[relative path, label, class name], ...]}; or,
    in a folder without one, CoOp's ImageNet-style (`classnames.txt`) or FGVC-Aircraft (`variants.txt`) form."""
    root = Path(root)
    if split_file is None and not root.exists():
        raise DataError(f"{root}: dataset folder not found")
    if split_file is None and root.is_dir() and not any(root.glob("split_zhou_*.json")):
        if (root / "classnames.txt").is_file():
            return load_imagenet_style(root)
        if (root / "variants.txt").is_file():
            return load_fgvc(root)
    path = Path(split_file) if split_file else find_split_file(root)
    if not path.is_file():
        raise DataError(f"{path}: split file not found; check the dataset path or --split-file")
    raw = _read_json(path)
    entries = {s: _coop_entries(raw, s, path) for s in SPLITS}
    classnames = _coop_classnames(entries, path)
    image_root = _coop_image_root(path.parent, next(e for es in entries.values() for e in es)[0], path)
    splits = {s: [Sample(image_root / rel, lbl, classnames[lbl]) for rel, lbl, _ in es] for s, es in entries.items()}
    return Dataset(path.stem.removeprefix("split_zhou_"), classnames, splits)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the split file as JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a split file must be a JSON object with 'train', 'val' and 'test' lists")
    return raw


def _coop_entries(raw: dict, split: str, path: Path) -> list[tuple[str, int, str]]:
    items = raw.get(split, [])
    if not isinstance(items, list):
        raise DataError(f"{path}: '{split}' must be a list of [path, label, classname]")
    out = []
    for i, item in enumerate(items):
        ok = isinstance(item, list) and len(item) == 3 and isinstance(item[1], int) and isinstance(item[2], str)
        if not ok or not isinstance(item[0], str) or item[1] < 0:
            raise DataError(f"{path}: {split}[{i}] must be [relative path, label ≥ 0, classname], got {item!r}")
        out.append((item[0], item[1], item[2].strip()))
    return out


def _coop_classnames(entries: dict[str, list[tuple[str, int, str]]], path: Path) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for rel, label, name in entries["train"]:
        if names.setdefault(label, name) != name:
            raise DataError(f"{path}: label {label} is both {names[label]!r} and {name!r} (at {rel})")
    if not names:
        raise DataError(f"{path}: the 'train' list is empty")
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{path}: train labels must be 0..{len(names) - 1}; found {sorted(names)}")
    for split in ("val", "test"):
        for rel, label, name in entries[split]:
            if names.get(label) != name:
                raise DataError(f"{path}: {split} image {rel} has class {name!r} (label {label}), unknown in train")
    return tuple(names[i] for i in range(len(names)))


def _coop_image_root(folder: Path, first_rel: str, path: Path) -> Path:
    """Images sit beside the split file, or in one of its sub-folders (CoOp's `image_dir`, e.g. `images/`)."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / first_rel).is_file():
            return candidate
    raise DataError(f"{path}: image {first_rel!r} not found beside the split file or in any sub-folder of {folder}")


# --- CoOp's ImageNet family and FGVC-Aircraft (no split file) ------------------------------------------

# Where each member of the ImageNet family keeps its class folders (CoOp's DATASETS.md): ImageNet's val (its test
# split), ImageNet-V2, -Sketch, -A, -R.
IMAGENET_TEST_FOLDERS = ("images/val", "imagenetv2-matched-frequency-format-val", "images", "imagenet-a", "imagenet-r")


def load_imagenet_style(root: Path) -> Dataset:
    """`classnames.txt` ("<wnid> <name>" per line, the label order) and class folders named by wnid (or by label
    index, ImageNet-V2): ImageNet (`images/train/`, and `images/val/` as test), Sketch (`images/`), -A
    (`imagenet-a/`), -R (`imagenet-r/`), -V2. A variant with some of the classes (A, R: 200) has those only."""
    table = _classnames_table(root / "classnames.txt")
    ids = {w for w, _ in table} | {str(i) for i in range(len(table))}
    test_dir = next((root / f for f in IMAGENET_TEST_FOLDERS
                     if (root / f).is_dir() and ids & {p.name for p in (root / f).iterdir()}), None)
    if test_dir is None:
        raise DataError(f"{root}: classnames.txt found but no class folders in any of {list(IMAGENET_TEST_FOLDERS)}")

    def folder(split_dir: Path, label: int, wnid: str) -> Path:
        return split_dir / wnid if (split_dir / wnid).is_dir() else split_dir / str(label)

    present = [(i, w, n) for i, (w, n) in enumerate(table) if folder(test_dir, i, w).is_dir()]
    classnames = tuple(n for _, _, n in present)
    splits = {"test": _folder_images([folder(test_dir, i, w) for i, w, _ in present], classnames)}
    if (root / "images" / "train").is_dir():
        splits["train"] = _folder_images([folder(root / "images" / "train", i, w) for i, w, _ in present],
                                         classnames)
    return Dataset(root.name, classnames, splits)


def _classnames_table(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        wnid, _, name = line.strip().partition(" ")
        if line.strip() and not name.strip():
            raise DataError(f"{path}:{number}: expected '<folder id> <class name>', got {line!r}")
        if line.strip():
            rows.append((wnid, name.strip()))
    return rows


def _folder_images(folders: list[Path], classnames: tuple[str, ...]) -> list[Sample]:
    return [Sample(p, label, classnames[label]) for label, folder in enumerate(folders)
            for p in sorted(folder.glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]


def load_fgvc(root: Path) -> Dataset:
    """CoOp's FGVC-Aircraft: `variants.txt` (one class per line, the label order), `images_variant_<split>.txt`
    ("<image id> <variant>" per line) and `images/<image id>.jpg`."""
    classnames = tuple(v.strip() for v in (root / "variants.txt").read_text(encoding="utf-8").splitlines()
                       if v.strip())
    index = {name: i for i, name in enumerate(classnames)}
    splits = {}
    for split in SPLITS:
        path = root / f"images_variant_{split}.txt"
        if not path.is_file():
            continue
        samples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            image, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DataError(f"{path}:{number}: variant {variant!r} is not in variants.txt")
            samples.append(Sample(root / "images" / f"{image}.jpg", index[variant], variant))
        splits[split] = samples
    return Dataset(root.name, classnames, splits)


# --- ImageFolder -------------------------------------------------------------------------------------


def load_imagefolder(root: str | Path) -> Dataset:
    """`root/<class>/*.jpg`, or `root/{train,val,test}/<class>/*.jpg`; folder names become class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if not split_dirs:
        log.warning("%s has no train/val/test folders: every split uses all its images", root)
        split_dirs = {s: root for s in SPLITS}
    folders = sorted(p.name for p in split_dirs.get("train", root).iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{split_dirs.get('train', root)}: no class folders found")
    classnames = tuple(_display_name(f) for f in folders)
    splits = {s: _folder_samples(d, folders, classnames) for s, d in split_dirs.items()}
    return Dataset(root.name, classnames, splits)


def _display_name(folder: str) -> str:
    return folder.replace("_", " ").strip()


def _folder_samples(split_dir: Path, folders: list[str], classnames: tuple[str, ...]) -> list[Sample]:
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in folders)
    if unknown:
        raise DataError(f"{split_dir}: class folder {unknown[0]!r} is not among the training classes")
    samples = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in (split_dir / folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [Sample(p, label, classnames[label]) for p in files]
    return samples


# --- CSV ---------------------------------------------------------------------------------------------


def load_csv(path: str | Path) -> Dataset:
    """A CSV with a header `path,label[,split]`; paths relative to the CSV, labels are class names."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CSV file not found")
    rows = _csv_rows(path)
    classnames = tuple(sorted({label for _, label, _ in rows}))
    index = {name: i for i, name in enumerate(classnames)}
    has_split = any(split for _, _, split in rows)
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for rel, label, split in rows:
        for s in ([split] if has_split else SPLITS):
            splits[s].append(Sample(path.parent / rel, index[label], label))
    if not has_split:
        log.warning("%s has no 'split' column: every split uses all its rows", path)
    return Dataset(path.stem, classnames, splits)


def _csv_rows(path: Path) -> list[tuple[str, str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: the CSV needs a header with 'path' and 'label' columns (and optional 'split')")
        rows = []
        for line, row in enumerate(reader, start=2):
            rel, label, split = ((row.get(k) or "").strip() for k in ("path", "label", "split"))
            if not rel or not label or (split and split not in SPLITS):
                raise DataError(f"{path}:{line}: needs a path, a label and a split in {list(SPLITS)} (or none)")
            rows.append((rel, label, split))
    if not rows:
        raise DataError(f"{path}: the CSV has no rows")
    return rows


# --- images ------------------------------------------------------------------------------------------


def open_image(path: Path) -> Image.Image:
    """An RGB image, or a DataError naming the file that is missing or does not decode."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: image does not decode ({exc}); remove it from the dataset or replace it") from exc
