"""The batched forward: each task kind gets the image forward it needs, once per micro-batch, and every job
gets the answers it would get alone."""

import pytest
import torch

from service.registry.directory import DirectoryRegistry
from service.serving.activation import BundleLimits
from service.serving.heads import ImageForward
from service.serving.runtime import ClassifyJob, ClassifyRuntime, Forward
from service.serving.tasks import TaskManager
from tests.helpers import coop_bundle, count_calls, maple_bytes, tgpt_bundle


def manager(backbone, tmp_path) -> TaskManager:
    return TaskManager(backbone, DirectoryRegistry(tmp_path / "registry"), BundleLimits())


def pixels_of(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_answers_as_alone(runtime: ClassifyRuntime, jobs: list[ClassifyJob], answers) -> None:
    for job, per_task in zip(jobs, answers, strict=True):
        for task, probabilities in zip(job.tasks, per_task, strict=True):
            (alone,) = runtime([ClassifyJob(job.pixels, (task,))])[0]
            assert probabilities.shape == (len(job.pixels), len(task.manifest.classnames))
            torch.testing.assert_close(probabilities, alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(probabilities.sum(-1), torch.ones(len(job.pixels)))


def test_jobs_of_different_text_side_tasks_share_one_forward(backbone, tmp_path, make_coop_bundle):
    tasks = manager(backbone, tmp_path)
    t = [tasks.publish(f"t{i}", make_coop_bundle(backbone, [f"c{i}{k}" for k in range(i + 2)], seed=i))
         for i in range(3)]
    pixels = pixels_of(5, 32)
    jobs = [ClassifyJob(pixels[:2], (t[0], t[1])), ClassifyJob(pixels[2:], (t[2],))]
    runtime = ClassifyRuntime(backbone)

    answers = runtime(jobs)

    assert list(runtime.forwards) == [Forward(ImageForward.PLAIN, 5)]
    assert [job.rows for job in jobs] == [2, 3], "a shared forward costs one row per image, whatever the tasks"
    assert_answers_as_alone(runtime, jobs, answers)


@pytest.fixture(scope="module")
def kinds(tiny_backbone, tmp_path_factory):
    """One task of each kind on the tiny CLIP: text-side (CoOp), vision-side (MaPLe), image-conditioned (TGP-T)."""
    tasks = manager(tiny_backbone, tmp_path_factory.mktemp("kinds"))
    return {
        "coop": tasks.publish("coop", coop_bundle(tiny_backbone, ["red", "green", "blue"])),
        "maple": tasks.publish("maple", maple_bytes(tiny_backbone, ("circle", "square", "star", "heart"), seed=1)),
        "maple2": tasks.publish("maple2", maple_bytes(tiny_backbone, ("ring", "cross"), seed=2)),
        "maple-shallow": tasks.publish("maple-shallow", maple_bytes(tiny_backbone, ("arrow", "ring"), seed=6, depth=1)),
        "tgpt3": tasks.publish("tgpt3", tgpt_bundle(tiny_backbone, 3, seed=3)),
        "tgpt40": tasks.publish("tgpt40", tgpt_bundle(tiny_backbone, 40, seed=4, content=20)),
    }


def test_a_text_side_and_a_vision_side_task_cost_one_plain_and_one_prompted_forward_and_no_text_call(
        tiny_backbone, kinds, monkeypatch):
    runtime = ClassifyRuntime(tiny_backbone)
    calls = count_calls(monkeypatch, tiny_backbone.text)
    job = ClassifyJob(pixels_of(3, 48), (kinds["coop"], kinds["maple"]))

    answers = runtime([job])

    assert list(runtime.forwards) == [Forward(ImageForward.PLAIN, 3), Forward(ImageForward.PROMPTED, 3)]
    assert calls == [], "class text features are cached at activation, for MaPLe's deep prompts too"
    assert job.rows == 6
    assert_answers_as_alone(runtime, [job], answers)


def test_rows_of_two_vision_side_tasks_share_one_prompted_forward(tiny_backbone, kinds):
    runtime = ClassifyRuntime(tiny_backbone)
    jobs = [ClassifyJob(pixels_of(2, 48, seed=1), (kinds["maple"],)), ClassifyJob(pixels_of(3, 48, seed=2),
                                                                              (kinds["maple2"], kinds["maple"]))]
    answers = runtime(jobs)
    assert list(runtime.forwards) == [Forward(ImageForward.PROMPTED, 2 + 3 + 3)]
    assert_answers_as_alone(runtime, jobs, answers)


def test_vision_side_tasks_of_different_prompt_depths_run_one_forward_per_shape(tiny_backbone, kinds):
    runtime = ClassifyRuntime(tiny_backbone)
    job = ClassifyJob(pixels_of(2, 48, seed=5), (kinds["maple"], kinds["maple-shallow"], kinds["maple2"]))
    answers = runtime([job])
    assert list(runtime.forwards) == [Forward(ImageForward.PROMPTED, 4), Forward(ImageForward.PROMPTED, 2)]
    assert_answers_as_alone(runtime, [job], answers)


def test_image_conditioned_tasks_of_3_and_40_classes_cost_two_text_calls_per_micro_batch(
        tiny_backbone, kinds, monkeypatch):
    runtime = ClassifyRuntime(tiny_backbone)
    calls = count_calls(monkeypatch, tiny_backbone.text)
    jobs = [ClassifyJob(pixels_of(2, 48, seed=3), (kinds["tgpt3"], kinds["coop"])),
            ClassifyJob(pixels_of(3, 48, seed=4), (kinds["tgpt40"], kinds["tgpt3"], kinds["maple"]))]

    answers = runtime(jobs)

    assert calls == [8, 8], "category prompts of every TGP-T row in one call, content prompts in one more"
    assert list(runtime.forwards) == [Forward(ImageForward.PLAIN_WITH_TOKENS, 5), Forward(ImageForward.PROMPTED, 3)]
    calls.clear()
    assert_answers_as_alone(runtime, jobs, answers)


def test_activating_an_image_conditioned_task_encodes_no_class_text(tiny_backbone, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, tiny_backbone.text)
    manager(tiny_backbone, tmp_path).publish("tgpt", tgpt_bundle(tiny_backbone, 40, seed=5))
    assert calls == []


def test_every_kind_has_a_head_and_every_registered_method_a_kind() -> None:
    from service.methods import METHODS, Kind
    from service.serving.heads import HEADS

    assert set(HEADS) == set(Kind)
    assert {spec.kind for spec in METHODS.values()} <= set(HEADS)
