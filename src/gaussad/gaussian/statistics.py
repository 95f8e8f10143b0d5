"""Gaussians of feature vectors, fitted from streaming moments, and the Mahalanobis distance.

A fit makes two passes over the feature batches and never holds the feature matrix:
  pass 1: n, Σ(x-K), Σ(x-K)(x-K)ᵀ in float64 (K = the first batch's mean, which keeps the sums
          well conditioned; x-K and the outer products in float32 for per-position Gaussians) -> mean,
          covariance, its eigenvectors -> the kept components (NPCA/PCA/none)
  pass 2: Σ‖z‖⁴ of the projected, centred vectors z -> the Ledoit-Wolf shrinkage of their covariance.
In the kept principal axes the sample covariance is diagonal (the eigenvalues λ), so the Ledoit-Wolf
estimate (1-s)·diag(λ) + s·mean(λ)·I is diagonal too, and so is its inverse, the precision.

Each Gaussian holds G groups fitted independently: G = 1 for one Gaussian shared by all samples, G = h·w
for one Gaussian per feature-map position (PaDiM's per-location mode). Batches are [n, G, D].
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from gaussad.validation import check_choice, check_number

REDUCTIONS = ("npca", "pca", "none")
COVARIANCES = ("ledoit-wolf", "ridge")


@dataclass
class Gaussian:
    """G Gaussians over D-dimensional vectors, each restricted to k kept principal axes."""

    mean: torch.Tensor  # [G, D]
    projection: torch.Tensor  # [G, D, k] orthonormal kept axes; zero columns pad groups that keep fewer
    precision: torch.Tensor  # [G, k] diagonal precision along the kept axes; 0 on padding
    shrinkage: torch.Tensor  # [G] Ledoit-Wolf shrinkage intensity

    def to(self, device: torch.device | str) -> "Gaussian":
        return Gaussian(*(t.to(device) for t in (self.mean, self.projection, self.precision, self.shrinkage)))

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """Distances of x [n, G, D] to each group's Gaussian -> [n, G]: centred, projected and
        weighted in the projection's precision (float32 for per-position Gaussians), summed in float64."""
        dtype = self.projection.dtype  # float32 for per-position Gaussians: no float64 copy of x
        centred = x.to(self.mean.device, dtype) - self.mean.to(dtype)
        # one matrix product per group, [G, n, D] @ [G, D, k]: no [G, D, k] temporary, and an exported
        # graph gets a batched MatMul (ONNX Runtime's Einsum is 3x slower)
        z = torch.matmul(centred.transpose(0, 1), self.projection).transpose(0, 1)
        return (z.square() * self.precision.to(dtype)).sum(-1, dtype=torch.float64).sqrt()


class MomentAccumulator:
    """Streaming sums for the mean and covariance of [n, G, D] batches: the shift K and Σ(x-K) in
    float64, Σ(x-K)(x-K)ᵀ in `dtype`; the mean and covariance are returned in float64."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.n, self.dtype = 0, dtype
        self.shift = self.sum = self.outer = None

    def update(self, x: torch.Tensor) -> None:
        if self.shift is None:
            # rounded to `dtype`, in which it is subtracted (float32 features need no float64 copy)
            self.shift = x.to(torch.float64).mean(0).to(self.dtype).to(torch.float64)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(*self.shift.shape, self.shift.shape[-1], dtype=self.dtype, device=x.device)
        self.n += x.shape[0]
        self.sum += x.sum(0, dtype=torch.float64) - x.shape[0] * self.shift  # Σ(x-K), in float64
        y = (x.to(self.dtype) - self.shift.to(self.dtype)).transpose(0, 1)  # [G, n, D]
        self.outer.baddbmm_(y.transpose(1, 2), y)  # in place: no second [G, D, D]

    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / self.n

    def state(self) -> dict[str, torch.Tensor]:
        """The sums as tensors to save: n, the shift, Σ(x-K) and the upper triangle of the
        (symmetric) Σ(x-K)(x-K)ᵀ, [G, D(D+1)/2], half the size of the whole."""
        rows, columns = torch.triu_indices(self.outer.shape[-1], self.outer.shape[-1])
        return {"n": torch.tensor(self.n, dtype=torch.int64), "shift": self.shift, "sum": self.sum,
                "outer": self.outer[:, rows, columns]}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "MomentAccumulator":
        """The accumulator `state()` saved, ready to take more batches."""
        packed = state["outer"]
        groups, dim = state["shift"].shape
        rows, columns = torch.triu_indices(dim, dim)
        if packed.shape != (groups, len(rows)):
            raise ValueError(f"the saved sums of outer products have shape {tuple(packed.shape)}, "
                             f"not {(groups, len(rows))}")
        moments = cls(packed.dtype)
        moments.n, moments.shift, moments.sum = int(state["n"]), state["shift"].double(), state["sum"].double()
        moments.outer = torch.zeros(groups, dim, dim, dtype=packed.dtype, device=packed.device)
        moments.outer[:, rows, columns] = packed
        moments.outer[:, columns, rows] = packed
        return moments

    def covariance(self, groups: slice = slice(None)) -> torch.Tensor:
        """The biased (1/n) sample covariance, as scikit-learn's Ledoit-Wolf uses: [G, D, D] (or
        of the `groups` only), in float64."""
        centred_sum = self.sum[groups] / self.n
        return (self.outer[groups].to(torch.float64) / self.n).sub_(centred_sum[:, :, None] * centred_sum[:, None, :])


def kept_counts(eigenvalues_ascending: torch.Tensor, reduction: str, variance: float) -> torch.Tensor:
    """How many axes a reduction keeps of each group's eigenvalues [G, D] (ascending): [G], counted
    as scikit-learn's PCA(n_components=fraction) does. npca: the least-variance axes that together
    hold at least `variance` of the total; pca: the largest-variance axes that together hold more
    than `variance`; none: all."""
    groups, dim = eigenvalues_ascending.shape
    if reduction == "none":
        return torch.full((groups,), dim, dtype=torch.long, device=eigenvalues_ascending.device)
    ordered = eigenvalues_ascending if reduction == "npca" else eigenvalues_ascending.flip(1)
    ratio = ordered.cumsum(1) / ordered.sum(1, keepdim=True)
    threshold = torch.full((groups, 1), variance, dtype=ratio.dtype, device=ratio.device)
    # npca: the first count whose ratio reaches v; pca: the first past v (scikit-learn's rule)
    return (torch.searchsorted(ratio, threshold, right=reduction == "pca")[:, 0] + 1).clamp(max=dim)


def ledoit_wolf_shrinkage(kept_values: torch.Tensor, counts: torch.Tensor, fourth_moment: torch.Tensor,
                          n: int) -> torch.Tensor:
    """Ledoit-Wolf intensity per group from the kept eigenvalues λ [G, k] (zero past each group's
    count) and Σ‖z‖⁴ [G] (scikit-learn's formula): [G].

    With S the sample covariance of the p kept coordinates: μ = tr(S)/p, ‖S‖²_F = Σλ²,
    β = (Σ‖z‖⁴/n − ‖S‖²_F) / (p·n), δ = (‖S‖²_F − p·μ²) / p, shrinkage = min(β, δ) / δ (0 for p = 1).
    """
    p = counts.to(torch.float64)
    mu = kept_values.sum(1) / p
    frobenius_sq = kept_values.square().sum(1)
    beta = (fourth_moment / n - frobenius_sq) / (p * n)
    delta = (frobenius_sq - p * mu**2) / p
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / delta)
    return torch.where(p == 1, torch.zeros_like(shrinkage), shrinkage)


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block (the process's setting is restored after it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


EIGH_GROUPS = 128  # eigendecompositions per call: bounds the [g, D, D] covariances and eigenvectors held


def _principal_axes(moments: MomentAccumulator, reduction: str, variance: float,
                    projection_dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per chunk of EIGH_GROUPS groups, the axes a reduction keeps: (counts [g], kept eigenvalues
    [g, w], projection [g, D, w] in `projection_dtype`), w = the chunk's largest count, the padding
    past a group's count zero. Chunks bound the [g, D, D] covariances and eigenvectors held."""

    def decompose(start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        eigenvalues, eigenvectors = torch.linalg.eigh(moments.covariance(slice(start, start + EIGH_GROUPS)))
        eigenvalues = eigenvalues.clamp(min=0)  # round-off makes rank-deficient spectra slightly negative
        groups, dim = eigenvalues.shape
        counts = kept_counts(eigenvalues, reduction, variance)
        width = int(counts.max())
        position = torch.arange(width, device=eigenvalues.device)
        kept = position < counts[:, None]
        # npca keeps the first `count` (smallest) axes; pca and none the last `count`, ascending
        axes = position.expand(groups, width) if reduction == "npca" else (dim - counts[:, None] + position)
        axes = axes.clamp(0, dim - 1)
        projection = torch.gather(eigenvectors, 2, axes[:, None, :].expand(groups, dim, width)) * kept[:, None, :]
        return counts, torch.gather(eigenvalues, 1, axes) * kept, projection.to(projection_dtype)

    # Many small eigenproblems: one thread each (threads inside one only fight: 60 s instead of
    # 0.3 s for 64 of 176²), the chunks spread over the cores.
    workers = torch.get_num_threads()
    with one_thread(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(decompose, range(0, len(moments.sum), EIGH_GROUPS)))


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """The chunks of _principal_axes as one (counts [G], kept eigenvalues [G, width], projection
    [G, D, width]), zero-padded to the widest; each chunk is freed once copied, so the projection
    is held about once, not twice."""
    width = max(int(counts.max()) for counts, _, _ in parts)
    counts = torch.cat([c for c, _, _ in parts])
    values = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for _, v, _ in parts])
    first = parts[0][2]
    projection = torch.empty(len(counts), first.shape[1], width, dtype=first.dtype, device=first.device)
    start = 0
    while parts:
        part = parts.pop(0)[2]
        stop = start + len(part)
        projection[start:stop, :, :part.shape[2]] = part
        projection[start:stop, :, part.shape[2]:] = 0
        start = stop
    return counts, values, projection


def fit_gaussian(
    batches: Callable[[], Iterable[torch.Tensor]],
    reduction: str = "npca",
    variance: float = 0.05,
    device: torch.device | str = "cpu",
    covariance: str = "ledoit-wolf",
    ridge: float = 0.01,
    dtype: torch.dtype = torch.float64,
    moments: "MomentAccumulator | None" = None,
) -> Gaussian:
    """Fit G Gaussians from `batches()`, a re-iterable source of [n, G, D] tensors (read twice for
    Ledoit-Wolf, once for ridge). `covariance`: the kept eigenvalues λ shrunk by Ledoit-Wolf, or
    λ + `ridge` (PaDiM's Σ + εI, in the kept axes). `dtype`: of the kept [G, D, k] axes and, unless
    `moments` are given, of the [G, D, D] sums of outer products; float32 halves the memory, time
    and folder size of per-position Gaussians (means, eigendecompositions and eigenvalues stay in
    float64). `moments`: an accumulator the batches are added to and that the caller keeps (to save
    it, or to add more images later: for ridge, the Gaussian of moments updated that way is the
    Gaussian of all their images); Ledoit-Wolf still reads `batches()` a second time."""
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("covariance", covariance, COVARIANCES)
    if reduction != "none":
        check_number("variance fraction", variance, float, 0, 1, open_low=True)
    if covariance == "ridge":
        check_number("ridge", ridge, float, 0, open_low=True)

    moments = MomentAccumulator(dtype) if moments is None else moments
    for batch in batches():
        moments.update(batch.to(device))
    if moments.n < 2:
        raise ValueError(f"a Gaussian needs at least 2 samples, got {moments.n}")
    n, mean = moments.n, moments.mean()
    parts = _principal_axes(moments, reduction, variance, dtype)
    del moments  # unless the caller keeps them: [G, D, D] sums, the most a per-position fit holds
    counts, kept_values, projection = _joined(parts)
    groups = len(mean)
    kept = torch.arange(projection.shape[2], device=mean.device) < counts[:, None]  # [G, width]

    if covariance == "ridge":
        precision = torch.where(kept, 1 / (kept_values + ridge), torch.zeros_like(kept_values))
        return Gaussian(mean, projection, precision, torch.zeros(groups, dtype=torch.float64, device=mean.device))

    fourth_moment = torch.zeros(groups, dtype=torch.float64, device=mean.device)
    for batch in batches():
        centred = (batch.to(mean.device, torch.float64) - mean).to(projection.dtype)
        z = torch.einsum("ngd,gdk->ngk", centred, projection).double()
        fourth_moment += z.square().sum(-1).square().sum(0)

    shrinkage = ledoit_wolf_shrinkage(kept_values, counts, fourth_moment, n)
    shrunk = (1 - shrinkage)[:, None] * kept_values + (shrinkage * kept_values.sum(1) / counts)[:, None]
    if not bool((shrunk[kept] > 0).all()):
        raise ValueError("the training features have zero variance: are all training images identical?")
    precision = torch.where(kept, 1 / shrunk, torch.zeros_like(shrunk))
    return Gaussian(mean, projection, precision, shrinkage)
