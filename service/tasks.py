"""Tasks: bundles turned into ready-to-serve classifiers, activated atomically.

Activation turns a bundle into its task head (service/heads.py): for a text-side method (zeroshot, coop,
qprompt, rlp) that is the class text features, computed once, and every such task shares one image forward.
The head is built *before* anything is stored or swapped, so a bundle that fails anywhere leaves the
previous version serving.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.backbone import Backbone
from service.bundle import DEFAULT_TEMPLATES, METHODS, Bundle, BundleError, Manifest, decode_bundle, fill_template
from service.config import BundleLimits
from service.heads import ImageConditionedHead, TaskHead, TextSideHead, VisionSideHead
from service.open_clip_compat import deep_prompt_depth_limit
from service.registry import Registry, TaskState, UnknownTask, VersionInfo, bundle_sha256, check_task_name
from service.tgpt import check_tgpt_backbone, model_from_bundle

log = logging.getLogger(__name__)

TEXT_BATCH = 256


def check_compatible(manifest: Manifest, backbone: Backbone, limits: BundleLimits) -> None:
    """Refuse bundles trained for another backbone or too costly to serve; nothing here touches a tensor."""
    if manifest.backbone.model != backbone.spec.model:
        raise BundleError(
            "backbone.model", f"bundle is for {manifest.backbone.model!r}, this service runs {backbone.spec.model!r}"
        )
    if manifest.backbone.fingerprint != backbone.fingerprint:
        raise BundleError(
            "backbone.fingerprint",
            "bundle was trained on other text-tower weights than this service's "
            f"({manifest.backbone.fingerprint[:19]}… vs {backbone.fingerprint[:19]}…); retrain it on this backbone",
        )
    spec = METHODS[manifest.method]
    if spec.needs_image_fingerprint and manifest.backbone.image_fingerprint != backbone.image_fingerprint:
        raise BundleError(
            "backbone.image_fingerprint",
            f"bundle was trained on another image tower than this service's ({manifest.backbone.image_fingerprint}"
            f" vs {backbone.image_fingerprint[:19]}…); retrain it on this backbone",
        )
    if spec.vision_side:
        _check_prompt_depth(manifest, backbone)
    if spec.image_conditioned:
        check_tgpt_backbone(manifest, backbone)
    if manifest.prompt.ctx_dim not in (0, backbone.text.width):
        raise BundleError("prompt.ctx_dim", f"is {manifest.prompt.ctx_dim}, the text width is {backbone.text.width}")
    if manifest.prompt.n_ctx + 2 > backbone.text.context_length:  # start and end tokens take two slots
        raise BundleError("prompt.n_ctx", f"is {manifest.prompt.n_ctx}; the text context holds "
                          f"{backbone.text.context_length} tokens")
    _check_cost(manifest, limits)


def _check_cost(manifest: Manifest, limits: BundleLimits) -> None:
    classes = len(manifest.classnames)
    if classes > limits.max_classes:
        raise BundleError("classnames", f"{classes} classes exceed this service's limit {limits.max_classes}")
    longest = max(len(name) for name in manifest.classnames)
    if longest > limits.max_classname_chars:
        raise BundleError("classnames", f"a class name of {longest} characters exceeds this service's limit "
                          f"{limits.max_classname_chars}")
    templates = manifest.options.get("templates", DEFAULT_TEMPLATES) if bundle_uses_templates(manifest) else ()
    if len(templates) > limits.max_templates:
        raise BundleError("options.templates", f"{len(templates)} templates exceed this service's limit "
                          f"{limits.max_templates}")
    if any(len(t) > limits.max_template_chars for t in templates):
        raise BundleError("options.templates", f"templates are limited to {limits.max_template_chars} characters")
    if classes * max(len(templates), 1) > limits.max_text_prompts:
        raise BundleError("options.templates", f"{classes} classes × {len(templates)} templates exceed this "
                          f"service's limit of {limits.max_text_prompts} prompts to encode")


def bundle_uses_templates(manifest: Manifest) -> bool:
    return not METHODS[manifest.method].uses_context


def check_finite_features(features: torch.Tensor) -> None:
    """Finite inputs can still overflow inside the encoder; such a bundle would answer null probabilities."""
    if not torch.isfinite(features).all():
        raise BundleError("tensors", "the bundle's text features are not finite (its values overflow the encoder)")


def _check_prompt_depth(manifest: Manifest, backbone: Backbone) -> None:
    """A vision-side bundle's deep prompts must fit both towers' depth and the image tower's width."""
    visual = backbone.model.visual
    depth_limit = deep_prompt_depth_limit(backbone.model)
    depth = manifest.options["depth"]
    if depth > depth_limit:
        raise BundleError("options.depth", f"is {depth}, this backbone allows at most {depth_limit}")
    if manifest.options["vision_width"] != visual.transformer.width:
        raise BundleError("options.vision_width",
                          f"is {manifest.options['vision_width']}, the image width is {visual.transformer.width}")


@torch.no_grad()
def text_features(bundle: Bundle, backbone: Backbone) -> torch.Tensor:
    """L2-normalized class text features [C, D] (float32, CPU) for a text-side bundle."""
    manifest, ctx = bundle.manifest, bundle.context(backbone.text)
    names = list(manifest.classnames)
    if ctx is None:
        templates = manifest.options.get("templates", list(DEFAULT_TEMPLATES))
        per_template = [_encode_in_batches(backbone, [fill_template(t, n) for n in names], None)
                        for t in templates]
        features = torch.stack(per_template).mean(dim=0)
    else:
        features = _encode_in_batches(backbone, names, ctx, manifest, bundle.deep_text_prompts())
    return F.normalize(features.float(), dim=-1).cpu()


def _encode_in_batches(
    backbone: Backbone, items: list[str], ctx: torch.Tensor | None, manifest: Manifest | None = None,
    deep: torch.Tensor | None = None,
) -> torch.Tensor:
    chunks = []
    for start in range(0, len(items), TEXT_BATCH):
        batch = items[start : start + TEXT_BATCH]
        if ctx is None:
            chunks.append(F.normalize(backbone.text.encode_texts(batch).float(), dim=-1))
        else:
            batch_ctx = ctx[start : start + TEXT_BATCH] if manifest.prompt.class_specific else ctx
            fixed_text = manifest.options.get("fixed_text", "") if deep is not None else ""
            chunks.append(backbone.text.encode_classes(batch, batch_ctx, manifest.prompt, deep, fixed_text).float())
    return torch.cat(chunks)


def text_side_head(bundle: Bundle, backbone: Backbone) -> TextSideHead:
    return TextSideHead(_checked_text_features(bundle, backbone))


def vision_side_head(bundle: Bundle, backbone: Backbone) -> VisionSideHead:
    return VisionSideHead(_checked_text_features(bundle, backbone), bundle.vision_prompts())


def image_conditioned_head(bundle: Bundle, backbone: Backbone) -> ImageConditionedHead:
    return ImageConditionedHead(model_from_bundle(bundle).to(backbone.device))


def _checked_text_features(bundle: Bundle, backbone: Backbone) -> torch.Tensor:
    features = text_features(bundle, backbone)
    check_finite_features(features)
    return features


# A bundle becomes a task head by its method's kind (service.bundle.MethodSpec.kind), which decides what the
# batched image forward must produce for it (service.runtime).
HEAD_BUILDERS: dict[str, Callable[[Bundle, Backbone], TaskHead]] = {
    "text": text_side_head,
    "vision": vision_side_head,
    "image-conditioned": image_conditioned_head,
}


@dataclass(frozen=True)
class ActiveTask:
    name: str
    version: int
    manifest: Manifest
    bundle_bytes: int
    head: TaskHead
    activated_at: float


class TaskManager:
    """Holds the active task of every name; swaps are single dict assignments, so readers see one version."""

    def __init__(self, backbone: Backbone, registry: Registry, limits: BundleLimits):
        self.backbone = backbone
        self.registry = registry
        self.limits = limits
        self._active: dict[str, ActiveTask] = {}
        self._task_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self.restore_failures: dict[str, str] = {}
        # Versions, aliases and remote changes: this replica's view of the aliases, the last version it could
        # not prepare per task (not retried until the registry moves on), and an LRU of prepared versions
        # (pinned requests, and the versions most recently swapped out, so a rollback is instant).
        self._aliases: dict[str, dict[str, int]] = {}
        self._failed_versions: dict[str, int] = {}
        self.prepared_cache_size = 4
        self._prepared: OrderedDict[tuple[str, int], ActiveTask] = OrderedDict()
        self._prepared_lock = threading.Lock()
        self._prepare_lock = threading.Lock()

    def get(self, name: str) -> ActiveTask:
        try:
            return self._active[name]
        except KeyError:
            raise UnknownTask(f"no task named {name!r}") from None

    def all(self) -> list[ActiveTask]:
        return sorted(self._active.values(), key=lambda t: t.name)

    def prepare(self, name: str, version: int, data: bytes) -> ActiveTask:
        """Decode, check and compute features; touches no shared state."""
        bundle = decode_bundle(data)
        check_compatible(bundle.manifest, self.backbone, self.limits)
        try:
            head = HEAD_BUILDERS[METHODS[bundle.manifest.method].kind](bundle, self.backbone)
        except BundleError:
            raise
        except ValueError as exc:  # e.g. a class prompt longer than the text context
            raise BundleError("classnames", str(exc)) from exc
        return ActiveTask(name, version, bundle.manifest, len(data), head, time.time())

    def publish(self, name: str, data: bytes) -> ActiveTask:
        """Make `data` the new active version of `name`, or raise and leave the old one serving."""
        check_task_name(name)
        with self._task_locks[name]:
            candidate = self.prepare(name, 0, data)
            version = self.registry.store_and_activate(name, data, candidate.manifest.method)
            task = dataclasses.replace(candidate, version=version, activated_at=time.time())
            self._swap(task)
        log.info("task %s: version %d active (%d classes)", name, version, len(task.manifest.classnames))
        return task

    def delete(self, name: str) -> None:
        with self._task_locks[name]:
            self.registry.delete(name)
            self._apply(name, None)

    def restore(self) -> None:
        """Bring back every task's active version after a restart; a damaged one is reported, never fatal."""
        self.resync()
        log.info("restored %d task(s), %d failed", len(self._active), len(self.restore_failures))

    # Versions, aliases, pinned versions and changes other replicas commit.

    def upload(self, name: str, data: bytes, retain: int = 0) -> tuple[ActiveTask, bool]:
        """`publish`, except that bytes identical to a stored version re-activate that version (False: not new).
        With `retain`, versions beyond the newest `retain` are pruned (never the active one or an alias target)."""
        check_task_name(name)
        known = self.registry.find_version(name, bundle_sha256(data))
        task = self.publish(name, data) if known is None else self.activate(name, known)
        if retain:
            self.prune(name, retain)
        return task, known is None

    def activate(self, name: str, version: int) -> ActiveTask:
        """Make a stored version active (rollback): prepared before the swap, so a failure leaves the old one."""
        with self._task_locks[name]:
            candidate = self._active[name] if self._serves(name, version) else self._prepared_version(name, version)
            self.registry.activate(name, version)
            task = dataclasses.replace(candidate, activated_at=time.time())
            self._swap(task)
        log.info("task %s: version %d activated", name, version)
        return task

    def resolve(self, name: str, ref: str) -> int:
        """A version number or alias → a version, from this replica's view (so it answers while the registry
        is down); a number is checked when it is loaded."""
        if ref.isdigit():
            return int(ref)
        aliases = self._aliases.get(name, {})
        if ref not in aliases:
            raise UnknownTask(f"task {name!r} has no alias {ref!r}")
        return aliases[ref]

    def pinned(self, name: str, ref: str) -> ActiveTask:
        """The task at a given version or alias, prepared on demand, without touching the active one."""
        version = self.resolve(name, ref)
        return self._active[name] if self._serves(name, version) else self._prepared_version(name, version)

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._aliases.get(name, {}))

    def versions(self, name: str) -> list[VersionInfo]:
        versions = self.registry.versions(check_task_name(name))
        if not versions:
            raise UnknownTask(f"no task named {name!r}")
        return versions

    def set_alias(self, name: str, alias: str, ref: str) -> dict[str, int]:
        with self._task_locks[name]:
            version = self.registry.resolve(name, ref)
            self.registry.set_alias(name, alias, version)
            self._aliases[name] = self.aliases(name) | {alias: version}
        return self.aliases(name)

    def delete_alias(self, name: str, alias: str) -> dict[str, int]:
        with self._task_locks[name]:
            self.registry.delete_alias(name, alias)
            self._aliases[name] = {k: v for k, v in self.aliases(name).items() if k != alias}
        return self.aliases(name)

    def prune(self, name: str, keep: int) -> list[int]:
        doomed = self.registry.prune(name, keep)
        with self._prepared_lock:
            for version in doomed:
                self._prepared.pop((name, version), None)
        if doomed:
            log.info("task %s: pruned versions %s", name, doomed)
        return doomed

    def sync(self, name: str) -> None:
        """Apply the registry's committed state of `name` (read under the task's lock, so a local write in
        flight is never undone); a version that cannot be prepared leaves the old one serving."""
        with self._task_locks[name]:
            self._apply(name, self.registry.task_state(name))

    def resync(self) -> None:
        """Match the registry: every task's active version and aliases, deleted tasks dropped. Also the
        restore after a start, since it starts from nothing."""
        snapshot = self.registry.snapshot()
        for name, reason in self.registry.damaged_tasks().items():
            if name not in snapshot:
                self.restore_failures[name] = reason
                log.error("task %s could not be restored: %s", name, reason)
        for name in sorted(set(snapshot) | set(self._active)):
            if not self._matches(name, snapshot.get(name)):
                self.sync(name)

    def _matches(self, name: str, state: TaskState | None) -> bool:
        if state is None:
            return name not in self._active and name not in self._aliases
        return self._settled(name, state.active) and self._aliases.get(name) == state.aliases

    def _settled(self, name: str, version: int) -> bool:
        """Serving `version` with no failure left to clear, or already failed to prepare it."""
        if self._failed_versions.get(name) == version:
            return True
        return self._serves(name, version) and name not in self.restore_failures

    def _serves(self, name: str, version: int) -> bool:
        current = self._active.get(name)
        return current is not None and current.version == version

    def _apply(self, name: str, state: TaskState | None) -> None:
        if state is None:
            self._active.pop(name, None)
            self._aliases.pop(name, None)
            self.restore_failures.pop(name, None)
            self._failed_versions.pop(name, None)
            with self._prepared_lock:  # a directory registry reuses the numbers of a deleted task
                for key in [key for key in self._prepared if key[0] == name]:
                    del self._prepared[key]
            return
        self._aliases[name] = dict(state.aliases)
        if self._serves(name, state.active):  # e.g. the registry moved back to the version this replica kept
            self.restore_failures.pop(name, None)
            self._failed_versions.pop(name, None)
            return
        if self._failed_versions.get(name) == state.active:
            return
        current = self._active.get(name)
        try:
            task = self._prepared_version(name, state.active)
        except Exception as exc:  # noqa: BLE001  # whatever one task's files hold, the others still serve
            self._failed_versions[name] = state.active
            self.restore_failures[name] = f"version {state.active} could not be prepared: {exc}"
            log.error("task %s: version %d could not be prepared, keeping %s: %s", name, state.active,
                      current.version if current else "none", exc)
            return
        self._swap(task)
        log.info("task %s: version %d applied from the registry", name, state.active)

    def _swap(self, task: ActiveTask) -> None:
        """Make `task` active; the one it replaces stays prepared, so rolling back costs nothing."""
        previous = self._active.get(task.name)
        self._active[task.name] = task
        self.restore_failures.pop(task.name, None)
        self._failed_versions.pop(task.name, None)
        if previous is not None:
            self._remember(previous)

    def _prepared_version(self, name: str, version: int) -> ActiveTask:
        task = self._cached(name, version)
        if task is not None:
            return task
        with self._prepare_lock:  # one on-demand preparation at a time: concurrent pins of one version share it
            task = self._cached(name, version) or self.prepare(name, version, self.registry.load(name, version))
            self._remember(task)
            return task

    def _cached(self, name: str, version: int) -> ActiveTask | None:
        with self._prepared_lock:
            task = self._prepared.get((name, version))
            if task is not None:
                self._prepared.move_to_end((name, version))
            return task

    def _remember(self, task: ActiveTask) -> None:
        with self._prepared_lock:
            self._prepared[(task.name, task.version)] = task
            self._prepared.move_to_end((task.name, task.version))
            while len(self._prepared) > self.prepared_cache_size:
                self._prepared.popitem(last=False)
