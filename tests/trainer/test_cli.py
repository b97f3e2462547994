"""The `promptserve-train` entry point end to end on fixture datasets, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.bundle.codec import decode_bundle, read_bundle
from tests.helpers import make_coop, make_csv, make_imagefolder
from trainer.cli import main
from trainer.world import FAMILIES
from trainer.world.dataset import write_imagefolder

MICRO = ["--model", "test-micro", "--random-weights", "--device", "cpu", "--no-progress"]
FAST = ["--epochs", "4", "--batch-size", "8", "--warmup-epochs", "1", "--lr", "0.01", "--views", "1"]


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict | None, str]:
    """main(argv) → (exit code, the printed JSON (train with --json), stderr)."""
    code = main([*argv, "--json"] if argv[0] == "train" else list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_train_eval_inspect_on_coop_layout(coop_root: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "colours.safetensors"
    code, result, err = _run(capsys, "train", "--method", "qprompt", "--bits", "2", "--data", str(coop_root),
                             "--shots", "4", "--output", str(bundle), *MICRO, *FAST)
    assert code == 0, err
    assert bundle.is_file() and Path(f"{bundle}.split.json").is_file()
    assert len(result["epochs"]) == 4 and 0 <= result["top1"] <= 100
    assert read_bundle(bundle).manifest.metrics["top1"] == result["top1"]
    code, evaluated, err = _run(capsys, "eval", "--bundle", str(bundle), "--data", str(coop_root), "--device", "cpu")
    assert code == 0, err
    assert evaluated["top1"] == result["top1"] and set(evaluated["per_class"]) == {"red", "green", "blue", "yellow"}
    code, inspected, _ = _run(capsys, "inspect", str(bundle))
    assert inspected["manifest"]["method"] == "qprompt" and inspected["prompt_values"] == 4 * 64
    assert inspected["payload_bytes"] == 4 * 64 * 2 // 8 + 4 * 2 + 8


@pytest.mark.parametrize("layout", ["imagefolder", "csv"])
def test_base_to_novel_reports_base_novel_and_hm(layout: str, tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data") if layout == "imagefolder" else make_csv(tmp_path)
    bundle = tmp_path / "b2n.safetensors"
    code, result, err = _run(capsys, "train", "--method", "rlp", "--layout", layout, "--data", str(data),
                             "--protocol", "base2novel", "--shots", "2", "--output", str(bundle), *MICRO, *FAST)
    assert code == 0, err
    assert read_bundle(bundle).manifest.classnames == ("blue", "green")  # sorted labels, first ceil(4/2)
    assert {"base", "novel", "hm"} <= set(result)
    code, evaluated, err = _run(capsys, "eval", "--bundle", str(bundle), "--layout", layout, "--data", str(data),
                                "--protocol", "base2novel", "--device", "cpu")
    assert code == 0, err
    assert evaluated == {k: result[k] for k in ("base", "novel", "hm")}


def _train_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--method", "coop", "--data", str(data), "--output", str(output), "--shots", "2",
            *MICRO, *FAST, *extra]


def test_missing_split_file_is_named_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    output = tmp_path / "out" / "task.safetensors"
    code, _, err = _run(capsys, *_train_args(tmp_path, output, "--split-file", str(tmp_path / "split_zhou_x.json")))
    assert code == 2 and "split_zhou_x.json" in err
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_too_many_shots_names_the_class_and_keeps_the_old_bundle(coop_root: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "task.safetensors"
    output.write_bytes(b"previous bundle")
    code, _, err = _run(capsys, *_train_args(coop_root, output, "--shots", "50"))
    assert code == 2 and "class 'red'" in err and "50 shots" in err
    assert output.read_bytes() == b"previous bundle" and sorted(p.name for p in tmp_path.iterdir()) == [output.name]


def test_undecodable_image_is_named_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    root = make_coop(tmp_path / "data", train=2, test=1)
    bad = root / "images" / "train" / "green" / "1.png"
    bad.write_bytes(b"\x89PNG truncated")
    output = tmp_path / "task.safetensors"
    code, _, err = _run(capsys, *_train_args(root, output))
    assert code == 2 and "1.png" in err and "does not decode" in err
    assert not any(p.name.startswith("task.safetensors") for p in tmp_path.iterdir())


def test_saved_split_repeats_a_base_to_novel_run(coop_root: Path, tmp_path: Path, capsys) -> None:
    first, again = tmp_path / "first.safetensors", tmp_path / "again.safetensors"
    code, result, err = _run(capsys, *_train_args(coop_root, first, "--protocol", "base2novel", "--seed", "7"))
    assert code == 0, err
    split = json.loads(Path(f"{first}.split.json").read_text())
    assert split["classnames"] == ["red", "green"] and len(split["train"]) == 2 * 2
    code, repeated, err = _run(capsys, *_train_args(coop_root, again, "--protocol", "base2novel", "--seed", "7",
                                                    "--shots", "1", "--load-split", f"{first}.split.json"))
    assert code == 0, err
    assert repeated["epochs"] == result["epochs"] and repeated["hm"] == result["hm"]
    code, _, err = _run(capsys, "eval", "--bundle", str(first), "--data", str(coop_root), "--device", "cpu")
    assert code == 2 and "class 'blue'" in err  # the base-only bundle does not know the novel classes


TINY = ["--model", "promptserve-tiny", "--pretrained", "world-v1", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of coded shape classes; the training images come with the renderer's captions."""
    root = tmp_path_factory.mktemp("world")
    write_imagefolder(root / "train", "shape-code", 2, seed=1, size=48, descriptions=True)
    write_imagefolder(root / "test", "shape-code", 1, seed=2, size=48)
    return root


def _tgpt_args(root: Path, output: Path, *extra: str) -> list[str]:
    return ["train", "--method", "tgpt", "--layout", "imagefolder", "--data", str(root), "--shots", "2",
            "--category-queries", "12", "--content-queries", "16", "--output", str(output), *TINY, *extra]


@pytest.mark.slow
def test_tgpt_trains_on_world_images_with_world_captions_into_a_bundle_the_service_decodes(
        world_root: Path, tmp_path: Path, capsys) -> None:
    bundle = tmp_path / "codes.safetensors"
    code, result, err = _run(capsys, *_tgpt_args(world_root, bundle, "--descriptions",
                                                 str(world_root / "train" / "descriptions.tsv"), "--epochs", "1",
                                                 "--batch-size", "32"))
    assert code == 0, err
    decoded = decode_bundle(bundle.read_bytes())
    assert decoded.manifest.method == "tgpt" and decoded.manifest.classnames[:2] == ("class-00", "class-01")
    assert decoded.manifest.options["category_queries"] == 12 and decoded.tensors["head.weight"].shape == (16, 256)
    assert result["train"]["optimizer"] == "adamw" and result["train"]["adam_eps"] == 1e-7
    assert 0 <= result["top1"] <= 100
    code, evaluated, err = _run(capsys, "eval", "--bundle", str(bundle), "--layout", "imagefolder",
                                "--data", str(world_root), "--device", "cpu")
    assert code == 0, err
    assert evaluated["top1"] == result["top1"]


@pytest.mark.parametrize(("extra", "message"), [
    (("--protocol", "base2novel", "--allow-missing-descriptions"), "base-to-novel does not apply"),
    ((), "pass --descriptions"),
    (("--descriptions", "nowhere.tsv"), "nowhere.tsv: cannot read the descriptions file"),
])
def test_tgpt_refusals_are_clear_and_write_nothing(world_root: Path, tmp_path: Path, capsys, extra, message) -> None:
    output = tmp_path / "task.safetensors"
    code, _, err = _run(capsys, *_tgpt_args(world_root, output, "--epochs", "1", *extra))
    assert code == 2 and message in err
    assert not output.exists()


def test_descriptions_flag_belongs_to_tgpt_only(coop_root: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, *_train_args(coop_root, tmp_path / "t.safetensors", "--descriptions", "x.tsv"))
    assert code == 2 and "options of --method tgpt" in err


def test_domain_generalization_and_cross_dataset_score_each_target(tmp_path: Path, capsys) -> None:
    source, outline, shapes = tmp_path / "faint", tmp_path / "outline", tmp_path / "shapes"
    write_imagefolder(source, "colour", 2, seed=1, style="faint", size=32)
    write_imagefolder(outline, "colour", 1, seed=2, style="outline", size=32)
    write_imagefolder(shapes, "shape", 1, seed=2, style="photo", size=32)
    bundle = tmp_path / "faint.safetensors"
    code, result, err = _run(capsys, "train", "--method", "coop", "--layout", "imagefolder", "--data", str(source),
                             "--protocol", "domaingen", "--eval-data", str(outline), "--shots", "2",
                             "--output", str(bundle), *MICRO, *FAST)
    assert code == 0, err
    assert set(result["targets"]) == {str(outline)} and 0 <= result["targets"][str(outline)]["top1"] <= 100
    code, evaluated, err = _run(capsys, "eval", "--bundle", str(bundle), "--layout", "imagefolder", "--data",
                                str(outline), "--device", "cpu", "--protocol", "domaingen")
    assert code == 0, err
    assert evaluated["top1"] == result["targets"][str(outline)]["top1"]
    code, transferred, err = _run(capsys, "eval", "--bundle", str(bundle), "--layout", "imagefolder", "--data",
                                  str(shapes), "--device", "cpu", "--protocol", "crossdataset")
    assert code == 0, err
    assert set(transferred["per_class"]) == set(FAMILIES["shape"])  # the prompt, applied to the shape classes
    code, _, err = _run(capsys, "eval", "--bundle", str(bundle), "--layout", "imagefolder", "--data", str(shapes),
                        "--device", "cpu", "--protocol", "domaingen")
    assert code == 2 and "is not one of the bundle's classes" in err


def test_transfer_protocol_without_a_target_is_refused_before_training(coop_root: Path, tmp_path: Path,
                                                                       capsys) -> None:
    output = tmp_path / "task.safetensors"
    code, _, err = _run(capsys, *_train_args(coop_root, output, "--protocol", "crossdataset"))
    assert code == 2 and "--eval-data" in err and not output.exists()


def test_rlp_init_follows_the_run_seed(coop_root: Path, tmp_path: Path, capsys) -> None:
    factors = {}
    for name, seed in (("first", "3"), ("again", "3"), ("other", "4")):
        output = tmp_path / f"{name}.safetensors"
        args = ["train", "--method", "rlp", "--data", str(coop_root), "--output", str(output), "--shots", "2",
                "--seed", seed, "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "0", "--optimizer", "sgd",
                "--lr", "0.2", "--views", "1", *MICRO]
        code, _, err = _run(capsys, *args)
        assert code == 0, err
        factors[name] = read_bundle(output).tensors
    assert all(torch.equal(factors["first"][k], factors["again"][k]) for k in ("a", "b"))
    assert not torch.equal(factors["first"]["b"], factors["other"]["b"])
