"""Data-parallel detection QAT and synthesis over ``torch.distributed``.

Launch one process per device; every process runs the same code on the same inputs::

    torchrun --nproc_per_node=2 -m pyzeroq.detection.cli detect-quantize --out q.pt            # CPU: gloo
    torchrun --nproc_per_node=8 -m pyzeroq.detection.cli detect-quantize --device cuda --out q.pt  # NCCL

The CLI calls :func:`init_from_env` (backend from the device, :func:`backend_for`: "gloo"
for CPU, "nccl" for CUDA, where each process takes ``cuda:<LOCAL_RANK>``); library users
call ``torch.distributed.init_process_group`` themselves. :func:`data_parallel` is None
unless a default process group is initialized with a world size > 1, so a single process
never communicates and runs exactly as before.

**QAT** (:func:`pyzeroq.detection.qat.run_qat`): every rank draws the same global batch
(same seed, same permutation as one process) and takes its contiguous shard
(:meth:`DataParallel.shard`; sizes differ by at most one image, so the global batch must
hold at least one image per rank). The loss of a rank is its share of the one-process
loss, so that the sum over ranks *is* the one-process loss:

* distillation parts (means over images, locations and channels) are scaled by
  ``n_local / n_global``;
* the task loss of a detector whose class sets ``global_loss_normalization = True`` (our
  FCOS) divides by the *global* number of positive locations and box-loss weight:
  the detector sums its normalizers with :func:`global_sum` (an all-reduce inside a
  data-parallel step, the identity otherwise). Any other detector's loss is taken as a
  mean over its images and scaled by ``n_local / n_global`` (what DDP does; exact
  only when the loss is a mean over images);

and the gradients are summed over ranks (:meth:`DataParallel.reduce_gradients`), so every
rank holds the one-process gradient before clipping; clipping, Adam, the learning-rate
schedule and the EMA then run identically on every rank and the weights stay equal.
Calibration of the activation ranges runs on every rank on all calibration images (the
same ranges as one process; percentiles do not shard). Then the parameters and buffers of
rank 0 are broadcast. BN running statistics cannot be updated identically from shards
(``train_bn_stats=True`` is refused; BN is in eval mode by default). The logged losses are
the global ones. Differences from one process are float summation order only
(see tests/test_detection_distributed.py for the measured size).

**Synthesis** (:func:`pyzeroq.detection.synthesis.synthesize`): the batches of a set are
independent (each has its own labels and images; the BN-statistics loss here is
per image, ZeroQ's form, and BN runs in eval mode), so whole batches are sharded
round-robin over ranks: batch ``b`` runs on rank ``b % world``. Every rank draws every
batch's seed labels and noise from the seeded generator (cheap) so each batch starts
from the same numbers as in one process, and its optimization is then the one-process
computation on the same batch size: the set gathered on every rank
(:meth:`DataParallel.gather`) is bitwise the one-process set. With fewer batches than
ranks, the remaining ranks idle. Distilled / Gaussian sets are computed on every rank.

Only rank 0 writes files (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

_ACTIVE: list = []   # data-parallel steps in progress (global_sum reduces inside one)


def backend_for(device: torch.device | str) -> str:
    """"nccl" for CUDA devices, "gloo" otherwise (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device: torch.device | str = "cpu") -> str:
    """Under ``torchrun`` (environment ``WORLD_SIZE`` > 1): initialize the default process group
    with :func:`backend_for` ``(device)`` unless one is initialized, and return the device of
    this process (``cuda:<LOCAL_RANK>`` for a CUDA device without an index, which is also made
    current). Otherwise return ``device`` unchanged. ValueError naming ``WORLD_SIZE`` /
    ``LOCAL_RANK`` for values that are not integers."""
    device = str(device)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE / LOCAL_RANK must be integers: {exc}") from exc
    if world <= 1:
        return device
    if torch.device(device).type == "cuda":  # "cuda": one GPU per process; an explicit index is kept
        device = f"cuda:{local}" if torch.device(device).index is None else device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return device


def data_parallel() -> DataParallel | None:
    """The data-parallel helper of the default process group when it is initialized with more
    than one process, else None (one process: nothing is communicated)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return None


def is_main() -> bool:
    """True in a single process and on rank 0 of a process group (the rank that writes files)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of ``value`` (e.g. a loss normalizer such as the number of positive
    locations) inside a data-parallel step; ``value`` itself otherwise. Every rank must call
    it the same number of times per step (call it unconditionally)."""
    if not _ACTIVE:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def global_loss(detector: nn.Module) -> bool:
    """Whether ``detector.loss`` normalizes by global counts through :func:`global_sum` (its class
    sets ``global_loss_normalization = True``)."""
    return bool(getattr(detector, "global_loss_normalization", False))


class DataParallel:
    """Rank and world size of the default process group, and the collectives of the
    data-parallel QAT / synthesis (module docstring)."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    # ---------------------------------------------------------------- QAT
    def check_qat(self, cfg, num_images: int) -> None:
        """ValueError for QAT settings that cannot match one process."""
        batch = min(cfg.batch_size, num_images)
        if batch < self.world:
            raise ValueError(f"batch_size: the global batch ({batch}: batch_size {cfg.batch_size}, {num_images} "
                             f"images) must hold at least one image per process ({self.world} processes)")
        if cfg.train_bn_stats:
            raise ValueError("train_bn_stats: BN running statistics cannot be updated identically from shards; "
                             "use train_bn_stats=False (the default) with several processes")

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of the global batch ``indices`` (sizes differ by at most 1)."""
        return torch.tensor_split(indices, self.world)[self.rank]

    @contextlib.contextmanager
    def step(self):
        """Within the block :func:`global_sum` reduces over ranks."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()

    @staticmethod
    def scale_parts(parts: dict, n_local: int, n_global: int, global_task: bool) -> dict:
        """Each part as this rank's share of the one-process value: ``* n_local / n_global``, except
        ``parts["task"]`` when the detector's loss is normalized globally (``global_task``)."""
        f = n_local / n_global
        return {k: v if k == "task" and global_task else v * f for k, v in parts.items()}

    def reduce_gradients(self, params) -> None:
        """Sum the gradients over ranks (one flat all-reduce). A parameter with a gradient on any
        rank gets one (zeros where it had none); one without a gradient anywhere keeps None."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        used = [p for p, h in zip(params, has.tolist()) if h > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not used:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in used])
        dist.all_reduce(flat)
        offset = 0
        for p in used:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def values(self, parts: dict) -> dict:
        """{name: float} of the sums over ranks of the 0-d tensors in ``parts`` (one all-reduce)."""
        if not parts:
            return {}
        v = torch.stack([t.detach().reshape(()).float() for t in parts.values()])
        dist.all_reduce(v)
        return dict(zip(parts, v.tolist()))

    def broadcast_state(self, model: nn.Module) -> None:
        """Parameters and buffers of rank 0 on every rank."""
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)

    # ---------------------------------------------------------------- synthesis
    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` (0-based) of a synthesis runs on this rank (round-robin)."""
        return batch % self.world == self.rank

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; tensors moved to CPU first)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
