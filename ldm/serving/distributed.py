"""The ranks of a job started by torchrun, for `ldm batch`: which rank this process is, its device, and the two
collectives a batch needs — rank 0's word on the batch's state (its seed) at the start, and a barrier that also
sums the ranks' counts before rank 0 merges their results. Nothing else travels between ranks: every image is
made by the one rank that owns its row, from the row's own seed.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE=1)
this is one rank and no process group is started. CPU ranks talk over gloo, CUDA ranks over NCCL, each rank
on `cuda:LOCAL_RANK`.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ldm.errors import InputError

# A rank that finishes its share first waits for the others in the closing barrier: as long as the imbalance of
# the shares, which in a long batch can be far more than torch's default of 30 minutes (10 for NCCL).
TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Ranks":
        """This process's place in a torchrun job (one rank of one when not started by torchrun)."""
        env = os.environ if env is None else env
        try:
            ranks = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError:
            raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
        if not 0 <= ranks.rank < ranks.world:
            raise InputError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world}")
        return ranks

    def device(self, requested: str) -> str:
        """The device of this rank: with several ranks, `auto` and `cuda` mean `cuda:LOCAL_RANK` (the CPU where
        there is no CUDA device for `auto`); one device for every rank is refused."""
        if self.world == 1:
            return requested
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return "cpu"
        if requested not in ("auto", "cuda"):
            raise InputError(f"--device {requested}: under torchrun each rank takes cuda:LOCAL_RANK; give --device "
                             "auto, cuda or cpu")
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
        if self.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={self.local_rank}, but this node has {torch.cuda.device_count()} CUDA "
                             "devices: start at most that many processes per node (--nproc-per-node)")
        return f"cuda:{self.local_rank}"

    def start(self, device: str) -> None:
        """Join the job's process group (NCCL for a CUDA device, gloo for the CPU); nothing with one rank."""
        if self.world == 1:
            return
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def from_rank0(self, compute: Callable[[], object]):
        """`compute()` as rank 0 finds it, on every rank: its value, or the InputError it raised (raised again
        on every rank, so that all of them stop with the same message instead of waiting for rank 0)."""
        if self.world == 1:
            return compute()
        answer = [None]
        if self.rank == 0:
            try:
                answer[0] = ("value", compute())
            except InputError as e:
                answer[0] = ("error", str(e))
        dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise InputError(value)
        return value

    def sum(self, counts: tuple[int, ...]) -> tuple[int, ...]:
        """The counts summed over the ranks; every rank waits here for all the others (the barrier)."""
        if self.world == 1:
            return counts
        everyone = [None] * self.world
        dist.all_gather_object(everyone, counts)
        return tuple(map(sum, zip(*everyone, strict=True)))


ONE = Ranks()  # a process on its own
