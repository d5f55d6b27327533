"""Data-parallel GPTQ over torch.distributed: the process group torchrun describes, each rank's
share of the calibration samples and of a solve's rows, the Hessian sum in a fixed order, the
gathers that give every rank the same quantized layer, and one line when a rank is lost.

`World()` (size 1) is a single process: every method returns its input unchanged and nothing
from torch.distributed is touched, so a single-process run is byte-for-byte what it always was.
`World.from_env()` joins the group torchrun (or any launcher setting RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT) describes: gloo on CPU, NCCL on CUDA, with a timeout on every
collective (`SOLAR_QUANT_DIST_TIMEOUT`, seconds).

Summation order (docs/distributed.md): each rank scales its partial Hessian by its share of the
tokens; the flattened matrix is cut into one block per rank and `all_to_all` hands every rank
block r of every partial; rank r sums them in rank order in float64, casts to float32 and
`all_gather` gives everyone every block. Each block is summed by one rank in one order, so
every rank holds the same bits and a rerun with the same world size repeats them.

Failures: a rank that fails writes one line under `solar_quant/down/<rank>` in the rendezvous
store and closes its connections; a rank whose collective fails (a peer died, or timed out)
reports itself too, waits `GRACE_S` for the others' reports, and names the ranks that sent none.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch

from solar_quant.errors import DistributedError, OptionError

TIMEOUT_ENV = "SOLAR_QUANT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0  # a collective waits this long for the slowest rank (rank 0 also writes)
GRACE_S = 5.0  # how long a failing rank waits for the others' reports before naming the silent ones
_DOWN = "solar_quant/down/"


def launched() -> bool:
    """Whether a launcher (torchrun) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def block(n: int, rank: int, size: int) -> slice:
    """Rank `rank`'s contiguous share of `n` items (samples or rows): the first n % size ranks
    get one more than the others."""
    return slice(n * rank // size, n * (rank + 1) // size)


@dataclass
class World:
    """This process's place in the job: rank 0 of 1 unless `from_env` joined a group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    where: str = "start-up"  # what the job is doing (named in a failure line)
    collective_s: float = 0.0  # seconds spent in collectives so far (the benchmark reads it)
    _store: object = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- joining and leaving --------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "cpu") -> "World":
        """Join the process group of this torchrun job (a single-process World without one)."""
        if not launched():
            return cls()
        import torch.distributed as dist

        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        timeout = _timeout_s()
        backend = "nccl" if device.strip().lower().startswith("cuda") else "gloo"
        if backend == "nccl":
            # a failed or timed-out collective raises in the waiting call instead of aborting the process
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend, rank=rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError are RuntimeErrors
            raise DistributedError(f"rank {rank} of {size}: could not join the process group at "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                                   f"{timeout:g} s ({_first_line(e)}); check the torchrun rendezvous flags "
                                   "and that every node started") from None
        store = dist.PrefixStore("solar_quant/", dist.distributed_c10d._get_default_store())
        return cls(rank=rank, size=size, local_rank=local, backend=backend, timeout_s=timeout, _store=store)

    @property
    def under_agent(self) -> bool:
        """Started by torchrun's agent, which stops every rank (SIGTERM) as soon as one has died:
        then a rank that never reports after such a stop is the dead one. (A rank stopped on its
        own, without an agent, names nobody: the others may just be busy computing.)"""
        return bool(os.environ.get("TORCHELASTIC_RUN_ID"))

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers live: NCCL moves CUDA tensors only, gloo CPU ones."""
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else torch.device("cpu")

    def device(self, name: str) -> str:
        """`--device` for this rank: cuda (or cuda:N) means this rank's own GPU, cuda:LOCAL_RANK."""
        if self.distributed and name.strip().lower().startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return name

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- shares -----------------------------------------------------------------------------
    def samples(self, n: int) -> slice:
        return block(n, self.rank, self.size)

    def rows(self, n: int) -> slice:
        return block(n, self.rank, self.size)

    def check_samples(self, n: int) -> None:
        if n < self.size:
            raise OptionError(f"--nsamples {n}: fewer calibration samples than the {self.size} processes; "
                              f"use at least {self.size} samples or fewer processes")

    # -- collectives ------------------------------------------------------------------------
    def reduce_hessian(self, H: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
        """The Hessian of every rank's tokens from this rank's `H` over its `count` tokens
        (H = 2/count Σ x xᵀ), summed in a fixed order; returned with the global token count."""
        if not self.distributed:
            return H, count
        counts = self._all_gather(torch.tensor([count], dtype=torch.int64, device=H.device))
        counts = [int(c) for c in counts]
        total = sum(counts)
        flat = H.reshape(-1)
        size, chunk = self.size, -(-flat.numel() // self.size)
        mine = torch.zeros(size * chunk, dtype=torch.float32, device=H.device)
        mine[:flat.numel()] = flat
        mine.mul_(count / total)  # this rank's share of 2/total Σ x xᵀ
        parts = torch.empty_like(mine)
        self._call("Hessian all-to-all", lambda d: d.all_to_all_single(parts, mine))
        del mine
        acc = torch.zeros(chunk, dtype=torch.float64, device=H.device)
        for r in range(size):  # rank order: the same sum on every run
            acc += parts[r * chunk:(r + 1) * chunk]
        del parts
        blocks = self._all_gather(acc.to(torch.float32))
        return torch.cat(blocks)[:flat.numel()].reshape(H.shape), total

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `t` (same shape on every rank), added in rank order in float64:
        the same float32 result on every rank and every run."""
        if not self.distributed:
            return t
        acc = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for part in self._all_gather(t.to(torch.float32).contiguous()):
            acc += part
        return acc.to(torch.float32)

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `rows(n)` block of a tensor (rows first), joined in rank order."""
        if not self.distributed:
            return part
        width = -(-n // self.size)
        padded = part.new_zeros((width, *part.shape[1:]))
        padded[:part.shape[0]] = part
        blocks = self._all_gather(padded)
        return torch.cat([b[:block(n, r, self.size).stop - block(n, r, self.size).start]
                          for r, b in enumerate(blocks)])

    def gather_samples(self, hidden: torch.Tensor, n: int) -> torch.Tensor | None:
        """Every rank's samples of the activations, in order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return hidden
        width = -(-n // self.size)
        padded = torch.zeros((width, *hidden.shape[1:]), dtype=hidden.dtype, device=self.comm_device)
        padded[:hidden.shape[0]] = hidden
        out = [torch.empty_like(padded) for _ in range(self.size)] if self.is_main else None
        self._call("activations gather", lambda d: d.gather(padded, out, dst=0))
        if not self.is_main:
            return None
        return torch.cat([b[:block(n, r, self.size).stop - block(n, r, self.size).start].cpu()
                          for r, b in enumerate(out)])

    def scatter_samples(self, full: torch.Tensor | None, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's activations `full` [n, ...] cut into every rank's samples."""
        if not self.distributed:
            return full
        n, width = shape[0], -(-shape[0] // self.size)
        mine = torch.empty((width, *shape[1:]), dtype=dtype, device=self.comm_device)
        pieces = None
        if self.is_main:
            pieces = []
            for r in range(self.size):
                piece = torch.zeros((width, *shape[1:]), dtype=dtype, device=self.comm_device)
                rows = block(n, r, self.size)
                piece[:rows.stop - rows.start] = full[rows]
                pieces.append(piece)
        self._call("activations scatter", lambda d: d.scatter(mine, pieces, src=0))
        rows = self.samples(n)
        return mine[:rows.stop - rows.start].cpu().clone()

    def share(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        self._call("broadcast", lambda d: d.broadcast_object_list(box, src=0))
        return box[0]

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        self._call("all-gather", lambda d: d.all_gather(out, tensor))
        return out

    def _call(self, what: str, fn) -> None:
        import torch.distributed as dist

        started = time.perf_counter()
        try:
            fn(dist)
        except RuntimeError as e:  # gloo/NCCL errors, DistBackendError, a timeout
            raise self.lost(f"{what} {self.where}", e) from None
        finally:
            self.collective_s += time.perf_counter() - started

    # -- failures ---------------------------------------------------------------------------
    def report(self, line: str) -> list[int]:
        """Tell the other ranks (through the rendezvous store) why this one stops, and close our
        connections so that ranks waiting on us fail now instead of at the timeout. Returns the
        ranks that sent no report of their own within GRACE_S (died, or hung)."""
        if not self.distributed:
            return []
        try:
            self._store.set(_DOWN + str(self.rank), line[:500])
        except RuntimeError:
            return []  # the store's host (rank 0, or the launcher) is gone: nobody is left to tell
        self.close()
        return self._wait_for_reports()[0]  # the store may live in this process: it stays up while the others read it

    def lost(self, what: str, error: BaseException) -> DistributedError:
        """The error to raise once a collective failed: report ourselves, wait for the others'
        reports, then name the ranks that sent none (died or hung) or the first that failed."""
        line = f"rank {self.rank} lost contact with the other ranks during {what}"
        silent, failed = self._wait_for_reports(line)
        if failed:  # a rank that said why it stopped is the cause; the silent ones may only be busy
            rank, message = failed[0]
            return DistributedError(f"rank {rank} of {self.size} stopped during {what}: {message}")
        if silent:
            names = ", ".join(map(str, silent))
            return DistributedError(f"rank {names} of {self.size} died or stopped responding during {what} "
                                    f"(no word from it within {GRACE_S:g} s; collectives time out after "
                                    f"{self.timeout_s:g} s)")
        return DistributedError(f"{line}: {_first_line(error)}")

    def _wait_for_reports(self, own: str | None = None) -> tuple[list[int], list[tuple[int, str]]]:
        """(ranks that sent no report within GRACE_S, [(rank, line)] of the others that did)."""
        others = [r for r in range(self.size) if r != self.rank]
        try:
            if own is not None:
                self._store.set(_DOWN + str(self.rank), own)
            deadline = time.monotonic() + min(GRACE_S, self.timeout_s)
            while True:
                heard = [r for r in others if self._store.check([_DOWN + str(r)])]
                if len(heard) == len(others) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            failed = [(r, self._store.get(_DOWN + str(r)).decode(errors="replace")) for r in heard]
        except RuntimeError:  # the store lived in rank 0's process (a launcher without an agent store)
            return ([0] if self.rank != 0 else others), []
        silent = [r for r in others if r not in heard]
        failed = [(r, m) for r, m in failed if "lost contact" not in m]
        return silent, failed


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise OptionError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
