"""The batched forward: jobs of several text-side tasks share one image forward and get their own answers."""

import torch

from service.config import BundleLimits
from service.heads import ImageNeed
from service.runtime import ClassifyJob, ClassifyRuntime, Forward
from service.tasks import TaskManager


def make_tasks(backbone, tmp_path, make_coop_bundle, count: int):
    from service.registry import DirectoryRegistry

    manager = TaskManager(backbone, DirectoryRegistry(tmp_path), BundleLimits())
    return [manager.publish(f"t{i}", make_coop_bundle(backbone, [f"c{i}{k}" for k in range(i + 2)], seed=i))
            for i in range(count)]


def test_jobs_of_different_text_side_tasks_share_one_forward(backbone, tmp_path, make_coop_bundle):
    tasks = make_tasks(backbone, tmp_path, make_coop_bundle, 3)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    jobs = [ClassifyJob(pixels[:2], (tasks[0], tasks[1])), ClassifyJob(pixels[2:], (tasks[2],))]
    runtime = ClassifyRuntime(backbone)

    together = runtime(jobs)

    assert list(runtime.forwards) == [Forward(ImageNeed.SHARED, 5)]
    assert [job.rows for job in jobs] == [2, 3], "a shared forward costs one row per image, whatever the tasks"
    for job, answers in zip(jobs, together, strict=True):
        for task, probabilities in zip(job.tasks, answers, strict=True):
            (alone,) = runtime([ClassifyJob(job.pixels, (task,))])[0]
            assert probabilities.shape == (len(job.pixels), len(task.manifest.classnames))
            assert torch.allclose(probabilities, alone, atol=1e-6)
            assert torch.allclose(probabilities.sum(-1), torch.ones(len(job.pixels)))
