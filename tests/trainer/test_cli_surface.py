"""What a user of `promptserve-train` meets first: help, refusals that say what to pass, the one-line summary."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.bundle.codec import read_bundle
from service.core.backbone import load_backbone
from service.methods import METHODS
from tests.helpers import ROOT, make_imagefolder
from trainer import run
from trainer.cli import build_parser, main

MICRO = ["--model", "test-micro", "--random-weights", "--device", "cpu", "--no-progress"]
ONE_EPOCH = ["--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--shots", "2", "--views", "1"]


def _fresh_main(argv: list[str]) -> tuple[set[str], str]:
    """(top-level modules loaded, stdout) after main(argv) in a fresh interpreter (help exits via SystemExit)."""
    code = ("import sys\nfrom trainer.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT)}, timeout=120)
    return set(done.stderr.split()), done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["inspect", "--help"]])
def test_help_imports_neither_torch_nor_open_clip(argv: list[str]) -> None:
    loaded, out = _fresh_main(argv)
    assert "trainer" in loaded and not {"torch", "open_clip"} & loaded
    assert "usage: promptserve-train" in out


def _inspected_in_process(path: Path) -> dict:
    """What inspect reports, computed from the fully decoded bundle (tensors materialized, with torch)."""
    bundle = read_bundle(path)
    layout = bundle.manifest.prompt
    classes = len(bundle.manifest.classnames) if layout.class_specific else 1
    prompt = bundle.class_prompt()
    deep = [t for t in (prompt.deep if prompt else None, bundle.vision_prompts()) if t is not None]
    return {
        "file_bytes": path.stat().st_size,
        "payload_bytes": bundle.payload_bytes,
        "prompt_values": classes * layout.n_ctx * layout.ctx_dim + sum(t.numel() for t in deep),
        "trainable_parameters": bundle.manifest.options.get("trainable_parameters"),
        "tensors": {k: {"dtype": str(t.dtype), "shape": list(t.shape)} for k, t in bundle.tensors.items()},
        "manifest": json.loads(bundle.manifest.to_json()),
    }


@pytest.mark.parametrize(("method", "extra"), [("coop", ()), ("qmaple", ("--depth", "2", "--bits", "2"))])
def test_inspect_reports_the_decoded_bundle_without_importing_torch(tmp_path: Path, capsys, method: str,
                                                                   extra: tuple[str, ...]) -> None:
    bundle = _train(tmp_path, capsys, method, *extra)
    loaded, out = _fresh_main(["inspect", str(bundle)])
    assert "service" in loaded and not {"torch", "open_clip"} & loaded
    assert json.loads(out) == _inspected_in_process(bundle)


def test_inspect_refuses_a_file_that_is_not_a_bundle(tmp_path: Path, capsys) -> None:
    for name, data in (("notes.txt", b"not a bundle at all"), ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(data)
        assert main(["inspect", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.startswith("error: bundle field 'file': ")


def test_train_help_shows_every_config_option_with_its_defaults_and_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("n-ctx", "ctx-init", "bits", "kl-threshold", "rank", "export-format", "depth", "category-queries",
                 "templates", "epochs", "warmup-epochs", "optimizer"):
        assert f"--{name}" in text
    assert text.count("--n-ctx N") == 2  # once in usage, once in the option list: shared fields appear once
    assert "(default: 4; maple, qmaple: 2) [coop, qprompt, rlp, maple, qmaple]" in text
    assert "(default: 1; qmaple: 4) [qprompt, qmaple]" in text
    assert "--export-format {merged,factorized}" in text and "--optimizer {sgd,adamw}" in text
    assert "(default: 0.002; maple, qmaple: 0.0035; rlp: 0.2; tgpt: 5e-05)" in text  # each method's own recipe
    assert "(default: 8; maple, qmaple, tgpt: 0)" in text  # cached views, or a fresh augmentation every step
    assert "--init-seed" not in text  # filled from --seed


def test_a_new_config_field_becomes_a_flag_without_touching_the_cli(monkeypatch, capsys) -> None:
    import dataclasses

    spec = METHODS["coop"]
    extra = dataclasses.make_dataclass("CoOpPlus", [("temperature", float, dataclasses.field(
        default=0.5, metadata={"help": "a new knob", "choices": (0.5, 1.0)}))], bases=(spec.config,))
    monkeypatch.setitem(METHODS, "coop", type("CoOpPlusSpec", (type(spec),), {"config": extra})())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--temperature {0.5,1.0}" in capsys.readouterr().out


def test_unknown_option_for_the_method_is_refused_by_name(tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    code = main(["train", "--method", "coop", "--rank", "2", "--layout", "imagefolder", "--data", str(data),
                 "--output", str(tmp_path / "b.safetensors"), *MICRO, *ONE_EPOCH])
    assert code == 2 and "has no option 'rank'" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ((), "pass --pretrained TAG|PATH"),
    (("--pretrained", "openai", "--random-weights"), "exclude each other"),
])
def test_weights_must_be_chosen_explicitly(tmp_path: Path, capsys, extra: tuple[str, ...], message: str) -> None:
    data = make_imagefolder(tmp_path / "data")
    output = tmp_path / "b.safetensors"
    code = main(["train", "--method", "coop", "--layout", "imagefolder", "--data", str(data), "--output", str(output),
                 "--model", "test-micro", "--device", "cpu", *ONE_EPOCH, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "--random-weights" in err
    assert not output.exists()


def test_a_folder_without_coop_split_suggests_imagefolder(tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    code = main(["train", "--method", "coop", "--data", str(data), "--output", str(tmp_path / "b.safetensors"),
                 *MICRO, *ONE_EPOCH])
    err = capsys.readouterr().err
    assert code == 2 and "split_zhou_" in err and "--layout imagefolder" in err


def _train(tmp_path: Path, capsys, method: str, *extra: str) -> Path:
    data = make_imagefolder(tmp_path / "data")
    output = tmp_path / f"{method}.safetensors"
    code = main(["train", "--method", method, "--layout", "imagefolder", "--data", str(data), "--output",
                 str(output), *MICRO, *ONE_EPOCH, *extra])
    assert code == 0, capsys.readouterr().err
    return output


def test_train_prints_one_summary_line_and_writes_the_full_result_next_to_the_bundle(tmp_path: Path,
                                                                                     capsys) -> None:
    capsys.readouterr()
    output = _train(tmp_path, capsys, "coop")
    lines = capsys.readouterr().out.splitlines()
    full = json.loads(Path(f"{output}.json").read_text())
    assert len(lines) == 1
    assert lines[0].startswith("coop: top-1 ") and f"bundle {full['bytes']:,} bytes" in lines[0]
    assert f"{full['seconds']:.1f} s" in lines[0] and f"{full['top1']:.1f}%" in lines[0]
    assert full["bytes"] == output.stat().st_size and len(full["epochs"]) == 1
    assert read_bundle(output).manifest.metrics["top1"] == full["top1"]


def test_json_flag_prints_the_full_result(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    output = _train(tmp_path, capsys, "rlp", "--json")
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(Path(f"{output}.json").read_text()) and printed["method"] == "rlp"


def test_one_epoch_trains_with_the_warm_up_lowered_to_none(tmp_path: Path, capsys) -> None:
    output = _train(tmp_path, capsys, "qprompt", "--json")
    result = json.loads(capsys.readouterr().out)
    assert result["train"]["epochs"] == 1 and result["train"]["warmup_epochs"] == 0
    assert output.is_file()


def test_an_explicit_warm_up_longer_than_the_run_is_still_refused(tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    code = main(["train", "--method", "coop", "--layout", "imagefolder", "--data", str(data),
                 "--output", str(tmp_path / "b.safetensors"), *MICRO, *ONE_EPOCH, "--warmup-epochs", "1"])
    assert code == 2 and "warmup_epochs (1) must be fewer than epochs (1)" in capsys.readouterr().err


# --- a trainer that guides: checks before torch, one-line errors, the default backbone, -v anywhere ----------


def _timed_failure(argv: list[str]) -> tuple[int, float, set[str], str]:
    """(exit code, seconds inside main, top-level modules loaded, stderr) of main(argv) in a fresh interpreter."""
    code = ("import sys, time\nstart = time.perf_counter()\nfrom trainer.cli import main\ncode = main(sys.argv[1:])\n"
            "print(code, time.perf_counter() - start, ' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT)}, timeout=120)
    exit_code, seconds, *modules = done.stdout.split()
    return int(exit_code), float(seconds), set(modules), done.stderr


def _unwritable(tmp_path: Path) -> str:
    """A folder no one may write in, root included (/sys refuses new files); the test needs one."""
    try:
        Path(tempfile.mkstemp(dir="/sys")[1]).unlink()
    except OSError:
        return "/sys/task.safetensors"
    pytest.skip("no folder here refuses writes to this user")


@pytest.mark.parametrize(("case", "message"), [
    ("missing data", "nowhere: dataset folder not found"),
    ("output inside a file", "is a file, not a folder"),
    ("unwritable output", "cannot write in /sys"),
    ("output is a folder", "is a directory"),
    ("missing checkpoint", "no such checkpoint file"),
    ("option of another method", "has no option 'rank'"),
    ("holdout out of range", "holdout must be in [0, 1)"),
    ("too many shots", "50 shots were asked"),
])
def test_argument_path_and_output_errors_come_before_torch_loads_in_a_second_or_so(tmp_path: Path, case: str,
                                                                            message: str) -> None:
    data = make_imagefolder(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    args = {"data": str(data), "output": str(tmp_path / "out" / "b.safetensors"), "extra": []}
    args |= {
        "missing data": {"data": str(tmp_path / "nowhere")},
        "output inside a file": {"output": str(tmp_path / "file" / "b.safetensors")},
        "unwritable output": {"output": _unwritable(tmp_path) if case == "unwritable output" else ""},
        "output is a folder": {"output": str(tmp_path)},
        "missing checkpoint": {"extra": ["--model", "ViT-B-16", "--pretrained", str(tmp_path / "vit.pt")]},
        "option of another method": {"extra": ["--rank", "2"]},
        "holdout out of range": {"extra": ["--holdout", "1.5"]},
        "too many shots": {"extra": ["--shots", "50"]},
    }[case]
    layout = [] if case == "missing data" else ["--layout", "imagefolder"]
    code, seconds, modules, err = _timed_failure(["train", "--method", "coop", "--data", args["data"], *layout,
                                                  "--output", args["output"], *args["extra"]])
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert not {"torch", "open_clip"} & modules  # what makes it fast, whatever the machine's load
    assert seconds < 3.0, f"{case}: {seconds:.2f} s"  # 0.4–0.7 s measured; importing torch alone took 7–17 s
    assert not (tmp_path / "out").exists()


def test_a_pretrained_tag_the_model_lacks_is_one_line_naming_its_tags(tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    code = main(["train", "--method", "coop", "--layout", "imagefolder", "--data", str(data), "--output",
                 str(tmp_path / "b.safetensors"), "--pretrained", "world-v2", *ONE_EPOCH])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --pretrained 'world-v2': model promptserve-tiny has no such tag; its tags: " \
                                "world-v1\n"


def test_default_backbone_is_the_services_so_default_bundles_load_in_a_default_service(tmp_path: Path,
                                                                                        capsys) -> None:
    from service.config import Settings
    from service.serving.activation import prepare

    settings = Settings()
    assert (run.DEFAULT_MODEL, run.DEFAULT_PRETRAINED) == (settings.model, settings.pretrained)
    data = make_imagefolder(tmp_path / "data")
    output = tmp_path / "b.safetensors"
    code = main(["train", "--method", "coop", "--layout", "imagefolder", "--data", str(data), "--output", str(output),
                 "--device", "cpu", "--no-progress", *ONE_EPOCH])
    assert code == 0, capsys.readouterr().err
    backbone = load_backbone(settings.backbone_spec())
    task = prepare("colours", 1, output.read_bytes(), backbone, settings.bundle_limits())
    assert task.manifest.backbone.model == "promptserve-tiny" and task.manifest.classnames == ("blue", "green",
                                                                                               "red", "yellow")


@pytest.mark.parametrize("argv", [["-v", "inspect", "b"], ["inspect", "b", "-v"], ["inspect", "-v", "b"]])
def test_verbose_works_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["inspect", "b"]).verbose is False


def test_one_progress_bar_covers_the_whole_training_run(tmp_path: Path, capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    code = main(["train", "--method", "coop", "--layout", "imagefolder", "--data", str(data), "--output",
                 str(tmp_path / "b.safetensors"), *MICRO[:-1], "--epochs", "3", "--batch-size", "4", "--shots", "4",
                 "--views", "1", "--warmup-epochs", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    bars = {line.split(":")[0] for line in err.replace("\r", "\n").splitlines() if "step" in line}
    assert bars == {"training coop"}  # one bar, not one per epoch
    assert "12/12" in err and "epoch=3/3" in err  # 4 classes × 4 shots / batch 4 × 3 epochs
