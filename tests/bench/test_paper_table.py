"""The reproduction harness end to end, on small synthetic datasets written in CoOp's layout (split_zhou JSON, and
CoOp's ImageNet form with a V2 variant) and the embedded tiny CLIP: the zero-shot check against a published
table, every protocol, resuming after an interruption, and the refusal when the zero-shot row is off."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import paper_table
from service.bundle.codec import Bundle
from service.core.backbone import Backbone
from tests.helpers import COLOURS, make_coop, write_images
from trainer import protocols
from trainer.data import load_coop
from trainer.evaluate import evaluate_base_novel
from trainer.fewshot import base_novel_split

ROWS = ["zero-shot CLIP", "Tip-Adapter", "CoOp", "MaPLe", "TGP-T"]


def _data(root: Path) -> Path:
    make_coop(root / "oxford_pets", train=4, test=3)
    make_coop(root / "eurosat", train=4, test=3)
    names = "".join(f"{c} {c}\n" for c in COLOURS)  # CoOp's ImageNet form: "<wnid> <name>", wnid folders
    write_images(root / "imagenet" / "images" / "train", 4, 5)
    write_images(root / "imagenet" / "images" / "val", 3, 6)
    (root / "imagenet" / "classnames.txt").write_text(names)
    target = root / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for i, colour in enumerate(COLOURS):
        write_images(target, 2, 7 + i, [colour])
        (target / colour).rename(target / str(i))
    (root / "imagenetv2" / "classnames.txt").write_text(names)
    return root


def _published(root: Path, backbone: Backbone, shift: float = 0.0) -> Path:
    """CLIP's 'published' base / novel accuracy, computed here through the service's own runtime (a path the
    harness's cached-feature scoring does not share), optionally shifted off."""
    table: dict[str, dict[str, list[float]]] = {}
    for key in ("oxford_pets", "imagenet"):
        dataset = load_coop(root / key)
        template = paper_table.DATASETS[key].template
        base = base_novel_split(dataset.classnames)[0].classnames
        bundle: Bundle = protocols.zero_shot_bundle(backbone, base, template)
        scores = evaluate_base_novel(bundle, backbone, dataset)
        table[key] = [scores.base.top1 + shift, scores.novel.top1 + shift, scores.hm]
    path = root / f"published{shift}.json"
    path.write_text(json.dumps({"base2novel": {"zero-shot CLIP": table}}))
    return path


def _argv(data: Path, out: Path, published: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--model", "promptserve-tiny", "--pretrained", "world-v1",
            "--device", "cpu", "--datasets", "oxford_pets", "imagenet", "--seeds", "1", "--shots", "2",
            "--fewshot-shots", "2", "--rows", *ROWS, "--train", "epochs=1", "batch_size=4", "views=1",
            "--published", str(published), "--tolerance", "0.01", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """The harness sets torch's thread count (`--threads 1`: on a loaded 2-core machine two threads ran 15× slower)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_harness_checks_zero_shot_runs_every_protocol_and_resumes(tmp_path: Path, tiny_backbone: Backbone,
                                                                  monkeypatch, capsys) -> None:
    data = _data(tmp_path / "data")
    out = tmp_path / "out"
    fits = []
    real_fit = protocols.fit

    def interrupted(*args, **kwargs):
        if len(fits) == 5:
            raise KeyboardInterrupt  # the run dies mid-way: five trained units stored
        fits.append(args[0])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(protocols, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        paper_table.main(_argv(data, out, _published(data, tiny_backbone)))
    stored = {p: p.read_bytes() for p in out.rglob("seed*.json")}
    assert len([p for p in stored if {"CoOp", "MaPLe", "TGP-T"} & set(p.parts)]) == 5
    fits.clear()
    monkeypatch.setattr(protocols, "fit", lambda *a, **k: fits.append(a[0]) or real_fit(*a, **k))
    assert paper_table.main(_argv(data, out, _published(data, tiny_backbone))) == 0
    report = capsys.readouterr().out
    assert all(p.read_bytes() == before for p, before in stored.items())  # finished units are read back, not redone
    trained_rows = 3  # CoOp, MaPLe, TGP-T (TGP-T sits out base-to-novel: its head cannot score novel classes)
    total = 2 * 2 + 2 * trained_rows + trained_rows + trained_rows  # base2novel, fewshot, crossdataset, domaingen
    assert len(fits) == total - 5
    assert report.count("| ok |") == 2 and "**off**" not in report
    for heading in ("Base-to-novel", "Few-shot", "Cross-dataset", "Domain generalisation", "Training memory"):
        assert f"### {heading}" in report
    assert "Not measured: no CUDA device" in report
    assert (out / "report.md").read_text().strip() == report.strip()
    b2n = json.loads((out / "base2novel" / "oxford_pets" / "MaPLe" / "seed1-shots2.json").read_text())
    assert {"base", "novel", "hm", "payload_bytes", "seconds"} <= set(b2n) and 0 <= b2n["novel"] <= 100
    xd = json.loads((out / "crossdataset" / "imagenet" / "TGP-T" / "seed1-shots2.json").read_text())
    assert set(xd["top1"]) == {"imagenet"}  # a per-class head scores its own classes only
    xd = json.loads((out / "crossdataset" / "imagenet" / "CoOp" / "seed1-shots2.json").read_text())
    assert set(xd["top1"]) == {"imagenet", "oxford_pets", "eurosat"}  # every target present, not only --datasets
    dg = json.loads((out / "domaingen" / "imagenet" / "CoOp" / "seed1-shots2.json").read_text())
    assert set(dg["top1"]) == {"imagenet", "imagenetv2"}


def test_harness_stops_before_training_when_the_zero_shot_row_is_off(tmp_path: Path, tiny_backbone: Backbone,
                                                                     capsys) -> None:
    data = _data(tmp_path / "data")
    out = tmp_path / "out"
    code = paper_table.main([*_argv(data, out, _published(data, tiny_backbone, shift=30.0)), "--protocols",
                             "base2novel"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: harness check failed on oxford_pets: zero-shot base")
    assert not [p for p in out.rglob("seed*.json") if "zero-shot-CLIP" not in p.parts]  # nothing trained
