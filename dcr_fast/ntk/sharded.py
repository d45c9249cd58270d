"""The eNTK matrix across the ranks of a torch.distributed group: probe features on a ring.

:func:`~dcr_fast.ntk.matrix.entk_matrix` comes here when the default process group has more
than one rank (``torchrun --nproc_per_node W``), or when its ``out_dir`` holds blocks of such
a run. The prompts are cut into chunks of ``chunk_size`` as in one process, and:

* **features once**: every chunk has one owner rank, which runs its prefix and probe passes
  (:func:`~dcr_fast.ntk.exact.prompt_probes`) — nobody else computes them;
* **blocks divided**: the unit of work is a block of the matrix, chunk i's rows × chunk j's
  columns. Features travel around a ring: at step s rank r holds its own chunks and those
  of rank r − s (received from rank r − 1 while it contracted step s − 1), and computes the
  blocks between the two sets assigned to it (:func:`plan_ring`). ``exact`` is symmetric, so
  only blocks i ≤ j are computed and the ring stops after ⌊W/2⌋ steps, the two ranks W/2
  apart splitting their blocks; ``fd`` and ``fd-reference`` need every block (the rows'
  prefix cache never leaves its owner) and go all the way round. A chunk travels only as
  far as a rank still needs it; a rank holds three sets of features at most (its own, the
  visiting, the arriving);
* **written by their owner**: each computed block's norms ‖K(x'_r, x_c)[So_r, Su_c]‖_F
  (float64, unnormalized) go to ``out_dir/blocks/`` as soon as they exist, atomically, by
  the rank that computed them. A rerun, under any world size or in one process, lists the
  blocks there, computes only the missing ones, and deals the chunks they involve afresh
  (most-missing first), so the missing work spreads over the ranks;
* **communication**: a chunk's features go W/2 hops (``exact``) or W − 1 (``fd``), so each rank
  sends about N·F/2 bytes or N·F·(W − 1)/W for F bytes of features a prompt, whatever W;
  the per-rank share of the contraction, ~N²/(2W) pairs, is what shrinks;
* **one matrix**: each rank adds the blocks it computed (and its share of those read back)
  into a zero N×N tensor, and one sum all-reduce assembles it: every entry comes from
  exactly one rank, so no sum rounds. Each block is the same computation on the same chunk
  as in one process, so the matrix is one process's to round-off (tested in float64 and
  float32).

Every rank returns the matrix; ``EntkMatrix.ranks`` (and ``out_dir/ranks.json``) reports each
rank's blocks, pairs, bytes sent and seconds per phase. ``out_dir`` must be one directory
every rank sees (a shared filesystem across nodes). ``offload_features`` keeps features in
host memory here too; they then travel over gloo (the ``cpu:gloo,cuda:nccl`` group that
:func:`dcr_fast.distributed.process_group` opens).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dcr_fast import atomic, distributed
from dcr_fast.ntk.exact import ProbeFeatures, probe_gram, prompt_probes
from dcr_fast.ntk.fd import fd_blocks
from dcr_fast.ntk.matrix import EntkMatrix, EntkMatrixConfig, group_means, open_run, pair_norms, write_outputs
from dcr_fast.ntk.reference import fd_reference_kernel, top_tokens
from dcr_fast.ntk.tail import TailSpec

# What each rank reports seconds for: its own chunks' features; waiting for features from the
# ring (which includes waiting for a slower neighbour); contracting blocks; writing them;
# assembling and all-reducing the matrix.
PHASES = ("features", "exchange", "blocks", "write", "assemble")
T = TypeVar("T")
_END = object()
Block = tuple[int, int]  # (row chunk, column chunk)
Payload = ProbeFeatures | torch.Tensor  # what travels: a chunk's features, or (fd-reference) its tokens


@dataclass(frozen=True)
class RingPlan:
    """Who computes what, when, for one run: a pure function of the missing blocks.

    ``owner[c]`` computes chunk c's features; ``work[(r, s)]`` lists the blocks rank r
    computes at step s, when it holds its own chunks and those of rank (r − s) mod W;
    ``last_step[c]`` is the last step at which a rank other than the owner needs chunk c
    (0: none), so c is forwarded along the ring until then and no further.
    """

    world: int
    owner: dict[int, int]
    work: dict[tuple[int, int], list[Block]]
    steps: int
    last_step: dict[int, int]

    def chunks_of(self, rank: int) -> list[int]:
        return sorted(c for c, r in self.owner.items() if r == rank)

    def sends(self, rank: int, step: int) -> list[int]:
        """Chunks ``rank`` passes to rank + 1 during step ``step``, for that rank's step + 1."""
        return [c for c in self.chunks_of((rank - step) % self.world) if self.last_step[c] > step]

    def sent_chunks(self, rank: int) -> int:
        return sum(len(self.sends(rank, step)) for step in range(self.steps - 1))


def plan_ring(missing: list[Block], world: int, *, symmetric: bool) -> RingPlan:
    """Deal the chunks of the ``missing`` blocks to ``world`` ranks and schedule the blocks.

    Chunks go round-robin in order of how many missing blocks involve them (most first, ties
    by index): on a fresh run that is chunk c to rank c mod W; on a rerun after a rank died,
    the chunks of its unfinished rows are dealt out over all ranks. A block (i, j) with i
    owned by rank a and j by rank b is computable by a at step (a − b) mod W (when a holds
    b's chunks) and, for a symmetric Gram, by b at step (b − a) mod W: the earlier of the two
    takes it; ranks W/2 apart alternate by the chunks' positions in their owners' lists.
    """
    involved = defaultdict(int)
    for i, j in missing:
        involved[i] += 1
        involved[j] += 1
    order = sorted(involved, key=lambda c: (-involved[c], c))
    owner = {c: position % world for position, c in enumerate(order)}
    slot = {c: position // world for position, c in enumerate(order)}
    work: dict[tuple[int, int], list[Block]] = defaultdict(list)
    last_step = {c: 0 for c in order}
    for i, j in missing:
        a, b = owner[i], owner[j]
        forward, backward = (a - b) % world, (b - a) % world
        # Ranks W/2 apart hold each other's chunks at the same step: the lower rank takes the
        # blocks whose slots in the owners' lists sum to an even number, a checkerboard.
        if symmetric and forward == backward and a != b:
            take_a = ((slot[i] + slot[j]) % 2 == 0) == (a < b)
        else:
            take_a = not symmetric or forward < backward
        rank, step, visitor = (a, forward, j) if take_a else (b, backward, i)
        work[(rank, step)].append((i, j))
        if step:
            last_step[visitor] = max(last_step[visitor], step)
    steps = 1 + max((step for _, step in work), default=0)
    return RingPlan(world, owner, dict(work), steps, last_step)


def sharded_matrix(
    model: nn.Module,
    spec: TailSpec,
    prompts: list[torch.Tensor],
    labels: list[str],
    group_names: list[str],
    config: EntkMatrixConfig,
    *,
    out_dir: Path | None,
    model_key: dict | None,
    overwrite: bool,
    progress: bool,
) -> EntkMatrix:
    """``entk_matrix`` across the default group's ranks (see the module docstring)."""
    world, me = distributed.world_size(), distributed.rank()
    device = next(model.parameters()).device
    n, size = len(prompts), config.chunk_size
    n_chunks = math.ceil(n / size)
    method = _METHODS[config.method](model, spec, prompts, config)
    everything = [(i, j) for i in range(n_chunks) for j in range(i if method.symmetric else 0, n_chunks)]
    store = None
    if out_dir is not None:
        store = _BlockStore(out_dir, config, labels, prompts, model_key, overwrite=overwrite)
    done = store.done() if store is not None else set()
    plan = plan_ring([b for b in everything if b not in done], world, symmetric=method.symmetric)
    phases = _Phases(device)
    storage = torch.device("cpu") if config.offload_features else device

    with phases("features"):
        own = {c: method.own(_rows(c, size, n)) for c in plan.chunks_of(me)}
        held: dict[int, Payload] = {c: _to(payload, storage) for c, (_, payload) in own.items()}
    with phases("exchange"):
        metas = {c: meta for part in distributed.all_gather_objects(
            {c: _on_meta(held[c]) for c in own}) for c, meta in part.items()}

    computed: dict[Block, np.ndarray] = {}
    mine = [b for s in range(plan.steps) for b in plan.work.get((me, s), [])]
    pairs = sum(len(_rows(i, size, n)) * len(_rows(j, size, n)) for i, j in mine)
    bar = tqdm(total=pairs, unit="pair", disable=not (progress and distributed.is_main()),
               desc=f"eNTK {config.method}, rank 0 of {world}")
    for step in range(plan.steps):
        incoming = _Transfer(plan, me, step, held, metas, storage)
        blocks = _contract(method, plan.work.get((me, step), []), held, own, device, config)
        for i, j, value in phases.timed("blocks", blocks):
            with phases("write"):
                computed[(i, j)] = value
                if store is not None:
                    store.save((i, j), value)
            bar.update(value.size)
        with phases("exchange"):
            held = {c: held[c] for c in own} | incoming.wait()
    bar.close()
    del held, own

    with phases("assemble"):
        norms = torch.zeros(n, n, dtype=torch.float64, device=device)
        read_back = [b for k, b in enumerate(sorted(done)) if k % world == me]
        for (i, j), value in list(computed.items()) + [(b, store.load(b)) for b in read_back]:
            block = torch.as_tensor(value, device=device)
            norms[_slice(i, size, n), _slice(j, size, n)] = block
            if method.symmetric:
                norms[_slice(j, size, n), _slice(i, size, n)] = block.T
        if world > 1:
            dist.all_reduce(norms)
        normalized = (norms / norms.diagonal()[:, None]).cpu().numpy()

    report = {
        "rank": me, "world": world, "feature_chunks": len(plan.chunks_of(me)),
        "feature_bytes": sum(_nbytes(metas[c]) for c in plan.chunks_of(me)),
        "blocks": len(mine), "pairs": pairs, "blocks_read_back": len(read_back),
        "sent_bytes": sum(_nbytes(metas[c]) for step in range(plan.steps - 1) for c in plan.sends(me, step)),
        "seconds": phases.seconds,
    }
    ranks = distributed.all_gather_objects(report)
    result = EntkMatrix(normalized, labels, group_names, group_means(normalized, labels, group_names), ranks)
    if store is not None and distributed.is_main():
        write_outputs(store.root, result)
    distributed.barrier()
    return result


def _contract(method, blocks: list[Block], held: dict[int, Payload], own: dict, device: torch.device,
              config: EntkMatrixConfig) -> Iterator[tuple[int, int, np.ndarray]]:
    """This step's blocks, row chunks ``offload_group`` at a time when features are offloaded
    (their features kept on the device meanwhile, every other chunk uploaded once per group)."""
    rows = sorted({i for i, _ in blocks})
    group = config.offload_group if config.offload_features else max(len(rows), 1)
    for start in range(0, len(rows), group):
        lefts = set(rows[start : start + group])
        resident: dict[int, Payload] = {}

        def upload(c: int) -> Payload:
            if c not in lefts:
                return _to(held[c], device)
            if c not in resident:
                resident[c] = _to(held[c], device)
            return resident[c]

        for j in sorted({j for i, j in blocks if i in lefts}):
            right = upload(j)
            for i in sorted(i for i, jj in blocks if jj == j and i in lefts):
                left = upload(i) if method.symmetric else own[i][0]  # fd: the row's cache and tokens
                yield i, j, pair_norms(method.block(i, left, j, right)).double().cpu().numpy()


class _Exact:
    """The structured Gram: features are all a block needs, on either side."""

    symmetric = True

    def __init__(self, model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], config: EntkMatrixConfig):
        self.model, self.spec, self.prompts, self.k = model, spec, prompts, config.k

    def own(self, rows: range) -> tuple[ProbeFeatures, Payload]:
        _, _, features = prompt_probes(self.model, self.spec, self.prompts[rows.start : rows.stop], k=self.k)
        return features, features

    def block(self, i: int, left: ProbeFeatures, j: int, right: ProbeFeatures) -> torch.Tensor:
        return probe_gram(left, right)


class _FiniteDifference(_Exact):
    """Batched fd: the rows' prefix cache and tokens stay with their owner, features travel."""

    symmetric = False

    def __init__(self, model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], config: EntkMatrixConfig):
        super().__init__(model, spec, prompts, config)
        self.eps = config.eps

    def own(self, rows: range):
        cache, tokens, features = prompt_probes(self.model, self.spec, self.prompts[rows.start : rows.stop], k=self.k)
        return (cache, tokens), features

    def block(self, i: int, left, j: int, right: ProbeFeatures) -> torch.Tensor:
        cache, tokens = left
        return fd_blocks(self.model, self.spec, cache, tokens, right, eps=self.eps)


class _Reference(_Exact):
    """fd-reference, pair by pair: only each prompt's top-k tokens travel."""

    symmetric = False

    def __init__(self, model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], config: EntkMatrixConfig):
        super().__init__(model, spec, prompts, config)
        self.size, self.eps = config.chunk_size, config.eps

    def own(self, rows: range):
        tokens = torch.stack([top_tokens(self.model, self.prompts[r], self.k) for r in rows])
        return tokens, tokens

    def block(self, i: int, left: torch.Tensor, j: int, right: torch.Tensor) -> torch.Tensor:
        """(n_i, n_j, k, k) kernels, in the layout of ``probe_gram``."""
        rows = _rows(i, self.size, len(self.prompts))
        cols = _rows(j, self.size, len(self.prompts))
        return torch.stack([
            torch.stack([
                fd_reference_kernel(self.model, self.spec, self.prompts[r], self.prompts[c], left[a], right[b],
                                    eps=self.eps)
                for b, c in enumerate(cols)
            ])
            for a, r in enumerate(rows)
        ])


_METHODS = {"exact": _Exact, "fd": _FiniteDifference, "fd-reference": _Reference}


class _BlockStore:
    """Blocks of norms on disk, ``blocks/b{i}_{j}.npy``; the run's identity checked by rank 0."""

    def __init__(self, root: Path, config: EntkMatrixConfig, labels: list[str], prompts: list[torch.Tensor],
                 model_key: dict, *, overwrite: bool):
        self.root = root

        def check() -> None:
            if not overwrite and any((root / "chunks").glob("rows_*.npy")):
                raise ValueError(f"out_dir {root} holds row chunks of a one-process run: resume it in one process "
                                 "(without torchrun), or use a fresh out_dir, or overwrite=True (--overwrite)")
            open_run(root, config, labels, prompts, model_key, overwrite=overwrite, kept="blocks")
            (root / "blocks").mkdir(exist_ok=True)

        distributed.on_main(check)

    def done(self) -> set[Block]:
        """The blocks on disk, as rank 0 sees them (every rank then works from the same list)."""
        return distributed.on_main(lambda: {_block_of(p.name) for p in (self.root / "blocks").glob("b*_*.npy")})

    def _path(self, block: Block) -> Path:
        return self.root / "blocks" / f"b{block[0]:06d}_{block[1]:06d}.npy"

    def save(self, block: Block, value: np.ndarray) -> None:
        atomic.write(self._path(block), lambda tmp: np.save(tmp, value), suffix=".npy")

    def load(self, block: Block) -> np.ndarray:
        return np.load(self._path(block))


def has_blocks(out_dir: Path | None) -> bool:
    """True when ``out_dir`` holds blocks of a run across ranks (which one process resumes here too)."""
    return out_dir is not None and any((Path(out_dir) / "blocks").glob("b*_*.npy"))


def _block_of(name: str) -> Block:
    i, j = name[1:-len(".npy")].split("_")
    return int(i), int(j)


class _Transfer:
    """One ring step's hand-over, posted before the step's blocks and awaited after them."""

    def __init__(self, plan: RingPlan, me: int, step: int, held: dict[int, Payload],
                 metas: dict[int, Payload], storage: torch.device):
        world = plan.world
        self.arriving = {c: _empty_like(metas[c], storage) for c in plan.sends((me - 1) % world, step)}
        sending = [t.contiguous() for c in plan.sends(me, step) for t in _leaves(held[c])]
        ops = [dist.P2POp(dist.isend, t, (me + 1) % world) for t in sending]
        ops += [dist.P2POp(dist.irecv, t, (me - 1) % world) for c in self.arriving for t in _leaves(self.arriving[c])]
        self.requests = dist.batch_isend_irecv(ops) if ops else []
        self.sending = sending  # alive until sent

    def wait(self) -> dict[int, Payload]:
        for request in self.requests:
            request.wait()
        return self.arriving


class _Phases:
    """Seconds per named phase, the device synchronized at each boundary so GPU work is counted
    where it was issued."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - started

    def timed(self, name: str, items: Iterator[T]) -> Iterator[T]:
        """``items``, the time spent producing each counted under ``name``."""
        while True:
            with self(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _rows(chunk: int, size: int, n: int) -> range:
    return range(chunk * size, min((chunk + 1) * size, n))


def _slice(chunk: int, size: int, n: int) -> slice:
    rows = _rows(chunk, size, n)
    return slice(rows.start, rows.stop)


def _leaves(payload: Payload) -> list[torch.Tensor]:
    """A payload's tensors in a fixed order (``ProbeFeatures.map``'s)."""
    if isinstance(payload, torch.Tensor):
        return [payload]
    leaves: list[torch.Tensor] = []
    payload.map(lambda t: leaves.append(t) or t)
    return leaves


def _apply(payload: Payload, fn) -> Payload:
    return fn(payload) if isinstance(payload, torch.Tensor) else payload.map(fn)


def _to(payload: Payload, device: torch.device) -> Payload:
    """``payload`` on ``device``; a download from a GPU lands in page-locked memory."""
    if isinstance(payload, torch.Tensor):
        return payload.to(device)
    return payload.to(device, pin=device.type == "cpu" and payload.tokens.is_cuda)


def _on_meta(payload: Payload) -> Payload:
    """Shapes and dtypes only: what a receiver needs to allocate for it."""
    return _apply(payload, lambda t: t.to("meta"))


def _empty_like(meta: Payload, device: torch.device) -> Payload:
    return _apply(meta, lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def _nbytes(payload: Payload) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(payload))
