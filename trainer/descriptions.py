"""Per-image descriptions for TGP-T's content prompts, from a TSV: `relative/path<TAB>description[<TAB>class]`.

Paths are relative to the TSV file's folder. Every training image needs a description; with
`allow_missing` an image without one trains without the content loss (the images are named in the log).
Problems are `DataError`s naming the file and line or the image.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.data import DataError, Sample

log = logging.getLogger(__name__)

MAX_DESCRIPTION_CHARS = 2000


def read_descriptions(path: str | Path) -> dict[Path, tuple[str, str | None]]:
    """Resolved image path → (description, class or None)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the descriptions file ({exc})") from exc
    out: dict[Path, tuple[str, str | None]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image, entry = _parse_line(line, f"{path}:{number}")
        key = (path.parent / image).resolve()
        if key in out:
            raise DataError(f"{path}:{number}: image {image!r} is described twice")
        out[key] = entry
    if not out:
        raise DataError(f"{path}: the descriptions file has no lines")
    return out


def _parse_line(line: str, where: str) -> tuple[str, tuple[str, str | None]]:
    fields = [f.strip() for f in line.split("\t")]
    if len(fields) not in (2, 3):
        raise DataError(f"{where}: expected 'relative/path<TAB>description[<TAB>class]', got {len(fields)} "
                        "tab-separated fields")
    image, description = fields[0], fields[1]
    if not image or not description:
        raise DataError(f"{where}: the image path and the description must both be non-empty")
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise DataError(f"{where}: the description is longer than {MAX_DESCRIPTION_CHARS} characters")
    return image, (description, fields[2] if len(fields) == 3 and fields[2] else None)


def descriptions_for(samples: list[Sample], table: dict[Path, tuple[str, str | None]],
                     allow_missing: bool = False) -> list[str | None]:
    """The description of every sample (None where missing and allowed); a class column must agree."""
    out: list[str | None] = []
    missing = []
    for s in samples:
        entry = table.get(Path(s.path).resolve())
        if entry is None:
            missing.append(s.path)
            out.append(None)
            continue
        description, classname = entry
        if classname is not None and classname != s.classname:
            raise DataError(f"image {s.path}: the descriptions file says class {classname!r}, the dataset "
                            f"{s.classname!r}")
        out.append(description)
    if missing and not allow_missing:
        raise DataError(f"image {missing[0]} has no description ({len(missing)} training image(s) lack one); "
                        "add them to the descriptions file or pass --allow-missing-descriptions")
    if missing:
        log.warning("%d training image(s) have no description and train without the content loss: %s",
                    len(missing), ", ".join(str(p) for p in missing[:10]))
    return out
