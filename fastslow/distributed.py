"""Past one process: the stages under ``torchrun``, on torch.distributed.

``torchrun --nproc_per_node N -m fastslow.stages STAGE ...`` starts N processes (ranks) that each
run the stage; :func:`join` puts them in one process group (gloo on the CPU, NCCL on GPUs). Then:

* training (:func:`fastslow.train.fit`) wraps the model in DistributedDataParallel, and each rank
  trains on its share of every global batch (:func:`rows_of_this_rank`), so N ranks take the steps
  one process would take on the whole batch: DDP averages their gradients;
* the dual encoder's contrastive loss sees the global batch's negatives (:func:`gather_rows`), and
  BatchNorm normalises with the global batch's statistics (:class:`GlobalBatchNorm`), so the
  trained weights equal, within float rounding, those of one process on the same global batches;
* feature extraction splits its chunks over the ranks (:mod:`fastslow.features`);
* rank 0 alone writes to the cache (:func:`fastslow.cache.load_or_build`), and the other ranks load
  what it wrote.

Outside torchrun (one process: notebooks, tests) every function here is a no-op.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# How long a rank waits for the others at a collective before giving up: long enough for rank 0 to
# build a cache entry that the others then load.
TIMEOUT = datetime.timedelta(hours=2)


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str) -> str:
    """Join the process group torchrun set up (gloo for ``cpu``, NCCL for ``cuda``) and return the
    device this rank works on (``cuda:<local rank>``: one GPU per process). Without torchrun,
    ``device`` as it is."""
    if not launched():
        return device
    on_gpu = device.startswith("cuda")
    if on_gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=TIMEOUT)
    return device


def rank_of_launch() -> int:
    """This process's rank as torchrun numbered it (0 without torchrun), before :func:`join`."""
    return int(os.environ.get("RANK", "0"))


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object), so all ranks take the same branch."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rows_of_this_rank(batch: Any) -> Any:
    """This rank's share of a global batch: of every tensor in ``batch`` (or anything else indexed
    by rows, such as :class:`fastslow.inputs.FeatureImages`: this layer cannot name it), the
    ``rank``-th of ``world_size`` contiguous blocks of rows. Rows that belong
    together stay together (a caption's M look-alikes are rows b*M .. b*M+M-1, so a block of
    whole captions holds them)."""
    if not active():
        return batch
    if isinstance(batch, dict):
        return {key: rows_of_this_rank(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(rows_of_this_rank(value) for value in batch)
    if isinstance(batch, str):
        return batch
    if isinstance(batch, torch.Tensor) or (hasattr(batch, "__len__") and hasattr(batch, "__getitem__")):
        rows, ranks = len(batch), world_size()
        if rows % ranks:
            raise ValueError(f"a global batch of {rows} rows does not split over {ranks} ranks: "
                             f"choose a batch size that {ranks} divides")
        share = rows // ranks
        return batch[rank() * share : (rank() + 1) * share]
    return batch


def data_parallel(model: nn.Module, device: str) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when several ranks train (which makes every rank
    start from rank 0's weights and averages the ranks' gradients); ``model`` itself otherwise.
    Every trained parameter must take part in each step (DDP says which one did not): the models
    that train under torchrun do, and searching the graph for unused ones costs every step."""
    if not active():
        return model
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _GatherRows(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order. Backward: each rank's gradient is the sum over
    ranks of the gradient of their rows, since every rank's loss read them."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(rows) for _ in range(world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.share = len(rows)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.contiguous()
        dist.all_reduce(gradient)
        start = rank() * ctx.share
        return gradient[start : start + ctx.share]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The global batch's rows on every rank, with gradients flowing back to each rank's own
    (CLIP-style negatives over the whole batch). Every rank must hold the same number of rows.

    Why the gradients come out right: every rank computes the whole batch's loss L, so the ranks'
    losses sum to N·L; each rank's own rows get the sum of all N losses' gradients, N·dL/drows,
    and DDP's average over ranks divides by N again."""
    return _GatherRows.apply(rows) if active() else rows


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone()
        dist.all_reduce(gradient)
        return gradient


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch (summed over ranks), on
    any device: torch's SyncBatchNorm runs on GPUs only. Same parameters and buffers as
    ``nn.BatchNorm2d``, so its weights load into the plain model; evaluation is BatchNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        channels = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                           x.new_full((1,), x.numel() / channels)])
        total = _SumOverRanks.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        variance = (total[channels : 2 * channels] / count - mean * mean).clamp(min=0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = variance * count / (count - 1).clamp(min=1.0)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        scale = self.weight * torch.rsqrt(variance + self.eps)
        return x * scale[:, None, None] + (self.bias - mean * scale)[:, None, None]


def with_global_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with each ``nn.BatchNorm2d`` turned into a :class:`GlobalBatchNorm` in place
    (same tensors), when several ranks train; ``model`` untouched otherwise."""
    if active():
        for module in model.modules():
            if type(module) is nn.BatchNorm2d:
                module.__class__ = GlobalBatchNorm
    return model
