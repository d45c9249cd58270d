"""How separable toxic and seemingly toxic prompts are inside a model (the paper's A.9).

At every layer, the hidden state of each prompt's last chat-templated token (the position that
predicts the first response token) is clustered by k-means with as many clusters as labels;
clusters are matched to labels by the Hungarian algorithm and the accuracy of that matching is
the layer's separability (0.5 is chance for two balanced labels, 1.0 perfect). Two-dimensional
classical (Torgerson) MDS pictures show the same activations, as in the paper's figure 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from dcr_fast.evaluation.generation import chat_texts, eval_mode, pad_batch, pad_token_id
from dcr_fast.figures import pyplot, save_figure


def separability(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 8,
    system_prompt: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """k-means + Hungarian accuracy per layer (index 0 = embeddings), for prompts with labels."""
    if len(prompts) != len(labels):
        raise ValueError(f"prompts and labels differ in length: {len(prompts)} vs {len(labels)}")
    hidden = last_token_hidden_states(model, tokenizer, prompts, batch_size=batch_size,
                                      system_prompt=system_prompt, progress=progress)
    return [kmeans_hungarian_accuracy(layer, labels, seed=seed) for layer in hidden]


@torch.no_grad()
def last_token_hidden_states(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Hidden states at each prompt's last templated token: [layers + 1, N, hidden], float32 CPU."""
    if not prompts:
        raise ValueError("prompts is empty")
    texts = chat_texts(tokenizer, prompts, system_prompt)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    states = []
    with eval_mode(model):
        for start in tqdm(range(0, len(encoded), batch_size), desc="hidden states", disable=not progress, leave=False):
            batch = encoded[start : start + batch_size]
            # Right padding: the last real token sees only real tokens, so its state equals
            # the unbatched one.
            input_ids, mask = pad_batch(batch, pad_id, device, side="right")
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            last = torch.tensor([len(ids) - 1 for ids in batch], device=device)
            rows = torch.arange(len(batch), device=device)
            states.append(torch.stack([h[rows, last] for h in out.hidden_states]).float().cpu())
    return torch.cat(states, dim=1)


def kmeans_hungarian_accuracy(features: torch.Tensor, labels: Sequence[str], *, seed: int = 0,
                              restarts: int = 10, iterations: int = 100) -> float:
    """Cluster `features` [N, d] into as many groups as `labels` has values, match clusters to
    labels one-to-one maximizing agreement, and return the fraction matched."""
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError(f"labels need at least two distinct values, got {names}")
    if features.shape[0] != len(labels):
        raise ValueError(f"features has {features.shape[0]} rows but labels has {len(labels)}")
    truth = torch.tensor([names.index(label) for label in labels])
    clusters = kmeans(features.double(), len(names), seed=seed, restarts=restarts, iterations=iterations)
    agreement = torch.zeros(len(names), len(names), dtype=torch.long)
    agreement.index_put_((clusters, truth), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    rows, cols = linear_sum_assignment(agreement.numpy(), maximize=True)
    return int(agreement[rows, cols].sum()) / len(labels)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 10, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; the best of `restarts` runs by inertia. Returns
    the cluster index of each row."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} points, got {x.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centers = _kmeans_plus_plus(x, k, generator)
        for _ in range(iterations):
            assignment = torch.cdist(x, centers).argmin(dim=1)
            updated = torch.stack([x[assignment == c].mean(0) if (assignment == c).any() else centers[c]
                                   for c in range(k)])
            if torch.equal(updated, centers):
                break
            centers = updated
        distances = torch.cdist(x, centers)
        inertia = distances.min(dim=1).values.square().sum().item()
        if inertia < best_inertia:
            best, best_inertia = distances.argmin(dim=1), inertia
    return best


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    centers = [x[torch.randint(x.shape[0], (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        nearest = torch.cdist(x, torch.stack(centers)).min(dim=1).values.square()
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
        centers.append(x[torch.multinomial(weights, 1, generator=generator)].squeeze(0))
    return torch.stack(centers)


def classical_mds(x: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """Torgerson's classical MDS of the rows of `x`: coordinates [N, dims] whose Euclidean
    distances best preserve those of `x` (exactly, when `x` spans at most `dims` dimensions)."""
    x = x.double()
    squared = torch.cdist(x, x).square()
    n = x.shape[0]
    centering = torch.eye(n, dtype=x.dtype) - 1.0 / n
    gram = -0.5 * centering @ squared @ centering
    values, vectors = torch.linalg.eigh(gram)
    top = values.flip(0)[:dims].clamp(min=0)
    return vectors.flip(1)[:, :dims] * top.sqrt()


def plot_mds(hidden: torch.Tensor, labels: Sequence[str], path: str | Path,
             layers: Sequence[int] | None = None, accuracies: Sequence[float] | None = None) -> Path:
    """One MDS scatter per layer (default: up to 8 evenly spaced) of [layers+1, N, d] states."""
    plt = pyplot()

    count = hidden.shape[0]
    layers = list(layers) if layers is not None else sorted({round(i * (count - 1) / 7) for i in range(8)})
    names = sorted(set(labels))
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        points = classical_mds(hidden[layer])
        for name in names:
            chosen = torch.tensor([label == name for label in labels])
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, label=name)
        title = f"layer {layer}" + (f"\nacc {accuracies[layer]:.2f}" if accuracies is not None else "")
        ax.set_title(title, fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path)
    return path
