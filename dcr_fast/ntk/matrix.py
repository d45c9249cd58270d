"""eNTK similarity of every prompt pair across named groups: the matrix, group means, heatmap.

``entk_matrix`` takes groups of prompts (e.g. toxic / seemingly toxic / normal) and returns
normalized[r, c] = ‖K(x'_r, x_c)[So_r, Su_c]‖_F / ‖K(x'_r, x'_r)[So_r, So_r]‖_F for all prompts
r, c in the concatenated groups, plus the per-group-pair means that make the heatmaps of
the paper's figures 3 and 6 (a prompt paired with itself is left out of the means).

Work is split into row chunks of ``chunk_size`` prompts x'. With ``out_dir`` each finished
chunk is written atomically to ``out_dir/chunks/`` and a rerun with the same settings skips
it, so a crashed run resumes where it stopped. The ``exact`` method records each prompt's
probe features once (:func:`dcr_fast.ntk.exact.probe_features`) and contracts chunk × chunk;
``fd`` reuses those features as its directions (:func:`dcr_fast.ntk.fd.fd_blocks`);
``fd-reference`` goes pair by pair as the paper does (normalizers once per prompt).

Under ``torchrun`` (a default process group of several ranks) the same call runs across the
ranks, each prompt's features computed by one rank and the matrix's blocks divided among
them: see :mod:`dcr_fast.ntk.sharded`.

Files in ``out_dir``: ``run.json`` (the key: settings, prompts, model and dtype, checked on resume),
``chunks/rows_*.npy`` (``blocks/b*_*.npy`` and ``ranks.json`` across ranks), ``matrix.npy``
(N×N float64), ``means.json`` and ``heatmap.png``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dcr_fast import atomic, distributed
from dcr_fast.figures import pyplot, save_figure
from dcr_fast.fingerprint import check_key, module_fingerprint
from dcr_fast.ntk.block import check_options, encode
from dcr_fast.ntk.exact import ProbeFeatures, probe_gram, prompt_probes
from dcr_fast.ntk.fd import fd_blocks
from dcr_fast.ntk.reference import fd_reference_kernel, top_tokens
from dcr_fast.ntk.tail import PrefixCache, TailSpec, tail_spec


@dataclass(frozen=True)
class EntkMatrixConfig:
    """Settings of one matrix run; the CLI flags mirror these fields."""

    k: int = 5
    tail_layers: int = 1
    include_lm_head: bool = True
    method: str = "exact"
    eps: float = 1e-3
    chunk_size: int = 64
    offload_features: bool = False
    offload_group: int = 4


@dataclass
class EntkMatrix:
    """normalized (N×N, row x', column x), each prompt's group, and the group-pair means."""

    normalized: np.ndarray
    labels: list[str]
    group_names: list[str]
    means: np.ndarray  # (G, G): rows x' group, columns x group
    ranks: list[dict] | None = None  # across ranks: each rank's work and time per phase

    def means_dict(self) -> dict[str, dict[str, float]]:
        return {
            a: {b: float(self.means[i, j]) for j, b in enumerate(self.group_names)}
            for i, a in enumerate(self.group_names)
        }


def entk_matrix(
    model: nn.Module,
    tokenizer,
    groups: dict[str, list],
    *,
    k: int = 5,
    tail_layers: int = 1,
    include_lm_head: bool = True,
    method: str = "exact",
    eps: float = 1e-3,
    chunk_size: int = 64,
    offload_features: bool = False,
    offload_group: int = 4,
    out_dir: str | os.PathLike | None = None,
    identity: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EntkMatrix:
    """All-pairs normalized eNTK similarity of the prompts in ``groups`` (see the module docstring).

    ``groups`` maps a group name to its prompts: strings (with ``tokenizer``, which applies
    the chat template) or 1-D LongTensors of token ids (``tokenizer=None``).
    ``offload_features`` keeps the per-prompt probe features (~18 MB a prompt for a 1.5B
    model) in host memory, for runs whose features do not fit on the accelerator: row chunks
    are then contracted ``offload_group`` at a time, their features held on the device
    meanwhile, so every other chunk is uploaded once per group rather than once per row chunk.

    With ``out_dir``, the run is keyed by its settings, prompts, the parameters' dtype and the
    model's ``identity`` (default: :func:`dcr_fast.fingerprint.module_fingerprint` of ``model``;
    the CLI passes the cheaper file fingerprint of the model it loaded): chunks saved under
    another key are refused, or deleted first with ``overwrite``.
    """
    config = EntkMatrixConfig(
        k, tail_layers, include_lm_head, method, eps, chunk_size, offload_features, offload_group
    )
    check_options(model, k=k, method=method, eps=eps)
    for name, value in (("chunk_size", chunk_size), ("offload_group", offload_group)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(groups, dict) or not groups or any(not isinstance(v, list) or not v for v in groups.values()):
        raise ValueError("groups must be a non-empty dict of group name -> non-empty list of prompts")
    device = next(model.parameters()).device
    labels = [name for name, items in groups.items() for _ in items]
    prompts = [
        encode(p, tokenizer, f"groups[{name!r}][{i}]", model).to(device)
        for name, items in groups.items()
        for i, p in enumerate(items)
    ]
    spec = tail_spec(model, tail_layers, include_lm_head)
    model_key = None
    if out_dir is not None:
        model_key = {"model": identity if identity is not None else module_fingerprint(model),
                     "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    from dcr_fast.ntk import sharded  # built on this module's pieces: imported once they exist

    if distributed.world_size() > 1 or (sharded.has_blocks(out_dir) and not overwrite):
        return sharded.sharded_matrix(
            model, spec, prompts, labels, list(groups), config,
            out_dir=None if out_dir is None else Path(out_dir), model_key=model_key, overwrite=overwrite,
            progress=progress,
        )
    store = None
    if out_dir is not None:
        store = _ChunkStore(Path(out_dir), config, labels, prompts, model_key, overwrite=overwrite)

    engine_class = _ReferenceEngine if method == "fd-reference" else _FeatureEngine
    engine = engine_class(model, spec, prompts, config, progress=progress)
    n = len(prompts)
    starts = range(0, n, chunk_size)
    rows_out: list[np.ndarray] = []
    with tqdm(total=n * n, unit="pair", disable=not progress, desc=f"eNTK {method}") as bar:
        for start in starts:
            rows = range(start, min(start + chunk_size, n))
            block = store.load(start) if store is not None else None
            if block is not None:
                engine.record(rows, block)
            else:
                block = engine.normalized_rows(rows)
                if store is not None:
                    store.save(start, block)
            rows_out.append(block)
            bar.update(len(rows) * n)

    normalized = np.concatenate(rows_out, axis=0)
    group_names = list(groups)
    result = EntkMatrix(normalized, labels, group_names, group_means(normalized, labels, group_names))
    if store is not None:
        store.finish(result)
    return result


def group_means(normalized: np.ndarray, labels: list[str], group_names: list[str]) -> np.ndarray:
    """Mean of ``normalized`` over pairs (x' in group a, x in group b), self-pairs excluded."""
    label_index = np.array([group_names.index(label) for label in labels])
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    means = np.full((len(group_names), len(group_names)), np.nan)
    for a in range(len(group_names)):
        for b in range(len(group_names)):
            mask = (label_index[:, None] == a) & (label_index[None, :] == b) & off_diagonal
            if mask.any():
                means[a, b] = normalized[mask].mean()
    return means


def save_heatmap(result: EntkMatrix, path: str | os.PathLike, title: str = "normalized eNTK ‖K(x′, x)‖") -> None:
    """The figure-3/6 style heatmap of group-pair means, written atomically as PNG."""
    plt = pyplot()

    g = len(result.group_names)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * g, 1.2 + 1.1 * g))
    image = ax.imshow(result.means, cmap="viridis")
    for i in range(g):
        for j in range(g):
            ax.text(j, i, f"{result.means[i, j]:.2f}", ha="center", va="center", color="w")
    ax.set_xticks(range(g), result.group_names, rotation=30, ha="right")
    ax.set_yticks(range(g), result.group_names)
    ax.set_xlabel("x")
    ax.set_ylabel("x′")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


class _FeatureEngine:
    """exact and fd: per chunk of prompts one prefix pass and one probe-feature pass, then
    chunk × chunk blocks — the structured Gram, or the batched finite difference.

    ``pair_norms[r, c]`` = ‖K(x'_r, x_c)[So_r, Su_c]‖_F as far as known. The exact Gram is
    symmetric, ‖K(x', x)‖_F = ‖K(x, x')‖_F, so for ``exact`` a row chunk reuses the blocks
    below the diagonal that earlier row chunks (computed or loaded) already gave. Row chunks
    are computed ``group`` at a time (``offload_group`` with offloaded features, else one).
    """

    def __init__(
        self, model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], config: EntkMatrixConfig, *, progress: bool
    ):
        self.chunk_size = config.chunk_size
        self.group = config.offload_group if config.offload_features else 1
        self.complete: set[int] = set()  # row chunks whose every block is in pair_norms
        self.device = next(model.parameters()).device
        self.chunks: list[_Chunk] = []
        starts = range(0, len(prompts), config.chunk_size)
        for start in tqdm(starts, desc="probe features", unit="chunk", disable=not progress):
            cache, tokens, features = prompt_probes(model, spec, prompts[start : start + config.chunk_size], k=config.k)
            if config.offload_features:
                features = features.to("cpu", pin=self.device.type == "cuda")
            self.chunks.append(_Chunk(cache if config.method == "fd" else None, tokens, features))
        self.symmetric = config.method == "exact"
        if self.symmetric:
            self.blocks = lambda left, right: probe_gram(left.features, right.features)
        else:
            self.blocks = lambda left, right: fd_blocks(
                model, spec, left.cache, left.tokens, right.features, eps=config.eps
            )
        n = len(prompts)
        self.pair_norms = torch.full((n, n), float("nan"), dtype=torch.float64, device=self.device)
        for i in range(len(self.chunks)):
            chunk = self._chunk(i)
            self.pair_norms[self._rows(i), self._rows(i)] = pair_norms(self.blocks(chunk, chunk)).double()
        self.self_norms = self.pair_norms.diagonal().clone()

    def normalized_rows(self, rows: range) -> np.ndarray:
        i = rows.start // self.chunk_size
        if i not in self.complete:
            self._contract(range(i, min(i + self.group, len(self.chunks))))
        norms = self.pair_norms[self._rows(i)]
        return (norms / self.self_norms[self._rows(i), None]).cpu().numpy()

    def record(self, rows: range, normalized: np.ndarray) -> None:
        """Take a row chunk read back from disk, so later chunks can reuse its blocks."""
        i = rows.start // self.chunk_size
        chunk = self._rows(i)
        block = torch.as_tensor(normalized, device=self.pair_norms.device) * self.self_norms[chunk, None]
        self.pair_norms[chunk] = block
        if self.symmetric:
            self.pair_norms[:, chunk] = block.T
        self.complete.add(i)

    def _contract(self, group: range) -> None:
        """Every missing block of the row chunks in ``group``: each other chunk is brought to the
        device once for the whole group, the group's own chunks stay there until it is done."""
        rows = [i for i in group if i not in self.complete]
        resident: dict[int, _Chunk] = {}

        def on_device(i: int) -> _Chunk:
            if i not in resident:
                resident[i] = self._chunk(i)
            return resident[i]

        for j in range(len(self.chunks)):
            lefts = [i for i in rows if j != i and not (self.symmetric and j < i)]
            if not lefts:
                continue
            right = on_device(j) if j in rows else self._chunk(j)
            for i in lefts:
                self.pair_norms[self._rows(i), self._rows(j)] = pair_norms(self.blocks(on_device(i), right)).double()
                if self.symmetric:
                    self.pair_norms[self._rows(j), self._rows(i)] = self.pair_norms[self._rows(i), self._rows(j)].T
        self.complete.update(rows)

    def _chunk(self, i: int) -> _Chunk:
        """Chunk ``i`` with its features on the model's device (a no-op unless offloaded)."""
        chunk = self.chunks[i]
        return chunk._replace(features=chunk.features.to(self.device))

    def _rows(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, self.pair_norms.shape[0]))


class _Chunk(NamedTuple):
    """One chunk of prompts as the feature engine keeps it."""

    cache: PrefixCache | None  # the prefix, kept for fd only: the Gram needs the features alone
    tokens: torch.Tensor  # (c, k) top-k tokens
    features: ProbeFeatures


class _ReferenceEngine:
    """fd-reference: pair by pair as the paper does, each prompt's normalizer computed once."""

    def __init__(
        self, model: nn.Module, spec: TailSpec, prompts: list[torch.Tensor], config: EntkMatrixConfig, *, progress: bool
    ):
        self.prompts = prompts
        self.kernel = lambda xp, x, so, su: fd_reference_kernel(model, spec, xp, x, so, su, eps=config.eps)
        self.tokens = [top_tokens(model, p, config.k) for p in prompts]
        self.self_norms = [
            torch.linalg.matrix_norm(self.kernel(p, p, t, t))
            for p, t in tqdm(list(zip(prompts, self.tokens)), desc="normalizers", disable=not progress)
        ]

    def normalized_rows(self, rows: range) -> np.ndarray:
        out = np.empty((len(rows), len(self.prompts)))
        for a, r in enumerate(rows):
            for c, x in enumerate(self.prompts):
                K = self.kernel(self.prompts[r], x, self.tokens[r], self.tokens[c])
                out[a, c] = float(torch.linalg.matrix_norm(K) / self.self_norms[r])
        return out

    def record(self, rows: range, normalized: np.ndarray) -> None:
        """Pairs are independent here: a chunk read back from disk offers nothing to reuse."""


def pair_norms(gram: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each (k×k) block of a (n, n', k, k') Gram."""
    return gram.pow(2).sum(dim=(2, 3)).sqrt()


class _ChunkStore:
    """Row chunks on disk, written atomically; a run's identity is checked before reuse."""

    def __init__(self, root: Path, config: EntkMatrixConfig, labels: list[str], prompts: list[torch.Tensor],
                 model_key: dict, *, overwrite: bool):
        self.root = root
        open_run(root, config, labels, prompts, model_key, overwrite=overwrite, kept="chunks")
        (root / "chunks").mkdir(parents=True, exist_ok=True)

    def _chunk(self, start: int) -> Path:
        return self.root / "chunks" / f"rows_{start:08d}.npy"

    def load(self, start: int) -> np.ndarray | None:
        path = self._chunk(start)
        return np.load(path) if path.exists() else None

    def save(self, start: int, block: np.ndarray) -> None:
        atomic.write(self._chunk(start), lambda tmp: np.save(tmp, block), suffix=".npy")

    def finish(self, result: EntkMatrix) -> None:
        write_outputs(self.root, result)


def open_run(root: Path, config: EntkMatrixConfig, labels: list[str], prompts: list[torch.Tensor], model_key: dict,
             *, overwrite: bool, kept: str) -> None:
    """Key ``root`` to this run in ``run.json`` (settings, prompts, model and dtype), or check the
    key there; ``overwrite`` first deletes an earlier run's results, row chunks or blocks
    alike. ``kept`` names what the run keeps in ``root``, for the error."""
    if overwrite:
        for folder in ("chunks", "blocks"):
            shutil.rmtree(root / folder, ignore_errors=True)
        for name in ("run.json", "matrix.npy", "means.json", "heatmap.png", "ranks.json"):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(p.cpu().numpy().astype(np.int64).tobytes() + b"|")
    # Where the features live does not change a number: a run may resume with or without offload.
    settings = {key: value for key, value in asdict(config).items() if not key.startswith("offload_")}
    key = {"config": settings, "labels": labels, "prompts_sha256": digest.hexdigest(), **model_key}
    check_key(root / "run.json", key, what=f"the eNTK {kept} in {str(root)!r}",
              remedy="use another out_dir (--out), or overwrite=True (--overwrite) to discard them")


def write_outputs(root: Path, result: EntkMatrix) -> None:
    """``matrix.npy``, ``means.json`` and ``heatmap.png`` of a finished run (and ``ranks.json``
    when it ran across ranks)."""
    atomic.write(root / "matrix.npy", lambda tmp: np.save(tmp, result.normalized), suffix=".npy")
    summary = {"groups": result.group_names, "labels": result.labels, "means": result.means_dict()}
    atomic.write_json(root / "means.json", summary, indent=1)
    if result.ranks is not None:
        atomic.write_json(root / "ranks.json", result.ranks, indent=1)
    save_heatmap(result, root / "heatmap.png")
