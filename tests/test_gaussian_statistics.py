"""gaussad.gaussian.statistics against independent references: scikit-learn's LedoitWolf and PCA, NumPy's eigh,
SciPy's mahalanobis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA

from gaussad.gaussian.statistics import fit_gaussian

# ---- helpers -------------------------------------------------------------------------------------


def batches_of(x: np.ndarray, sizes=None):
    """A re-iterable batch source over x [n, D] (as [b, 1, D]) or x [n, G, D], split into `sizes`."""
    x = x[:, None, :] if x.ndim == 2 else x
    sizes = [len(x)] if sizes is None else list(sizes)
    assert sum(sizes) == len(x)
    edges = np.cumsum([0, *sizes])

    def source():
        for a, b in zip(edges[:-1], edges[1:]):
            yield torch.from_numpy(np.ascontiguousarray(x[a:b]))

    return source


def correlated(rng, n, dim, offset=3.0):
    """Correlated Gaussian data with a non-zero mean."""
    mixing = rng.normal(size=(dim, dim))
    return rng.normal(size=(n, dim)) @ mixing + offset * rng.normal(size=dim) + 10.0


def known_spectrum(rng, n, eigenvalues, offset=5.0):
    """X = Z·diag(sqrt(λ))·Qᵀ + μ with a random orthogonal Q."""
    dim = len(eigenvalues)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    return rng.normal(size=(n, dim)) @ np.diag(np.sqrt(eigenvalues)) @ q.T + offset * rng.normal(size=dim)


def kept(g, group=0):
    """(axes [D, k], precision [k]) of one group, padding columns dropped."""
    precision = g.precision[group].numpy()
    count = int((precision > 0).sum())
    assert np.all(precision[count:] == 0), "padding must come after the kept axes"
    return g.projection[group, :, :count].numpy(), precision[:count]


def precision_matrix(g, group=0):
    """The precision in the original coordinates: V·diag(precision)·Vᵀ (sign/order invariant)."""
    axes, precision = kept(g, group)
    return axes @ np.diag(precision) @ axes.T


def projector(axes):
    return axes @ axes.T


def rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def sample_eigh(x):
    """Eigenvalues (ascending) and eigenvectors of the biased sample covariance, by NumPy."""
    return np.linalg.eigh(np.cov(x, rowvar=False, bias=True))


# Known spectra: npca-0.05 and pca-0.95 counts are clear of the thresholds by a wide margin.
# ascending; total 104.6; the 4 least hold 2.5 %, the 5 least 5.4 %; the 12 largest hold 97.5 %, 11 hold 94.6 %
SPECTRUM = np.array([0.5, 0.6, 0.7, 0.8, *np.arange(3.0, 15.0)])
EXPECTED_COUNT = {"npca": 5, "pca": 12}


# ---- reduction "none": Ledoit-Wolf ----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, dim, offset", [(400, 12, 3.0), (25, 40, 3.0), (300, 6, 1e6)], ids=["n>D", "n<D", "large-offset"]
)
def test_none_matches_sklearn_ledoit_wolf(n, dim, offset):
    """The large offset checks the streaming sums stay well conditioned (features far from zero)."""
    rng = np.random.default_rng(n + dim)
    x = correlated(rng, n, dim, offset=offset)
    sizes = [n // 3, n // 3, n - 2 * (n // 3)]
    g = fit_gaussian(batches_of(x, sizes), reduction="none")
    reference = LedoitWolf().fit(x)

    assert g.projection.shape == (1, dim, dim) and g.precision.shape == (1, dim)
    axes, precision = kept(g)
    assert axes.shape == (dim, dim)
    covariance = axes @ np.diag(1 / precision) @ axes.T
    assert rel_err(covariance, reference.covariance_) < 1e-6
    assert float(g.shrinkage[0]) == pytest.approx(reference.shrinkage_, rel=1e-8, abs=1e-12)
    if n < dim:  # the regime where shrinkage matters
        assert reference.shrinkage_ > 0.01
    np.testing.assert_allclose(g.mean[0].numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(axes.T @ axes, np.eye(dim), atol=1e-10)


# ---- npca / pca: the kept subspace and count ------------------------------------------------------


@pytest.mark.parametrize("reduction, variance", [("npca", 0.05), ("pca", 0.95)])
def test_reduction_keeps_the_right_eigenvectors(reduction, variance):
    rng = np.random.default_rng(7)
    x = known_spectrum(rng, 20000, SPECTRUM)
    g = fit_gaussian(batches_of(x, [5000] * 4), reduction=reduction, variance=variance)
    axes, precision = kept(g)
    count = axes.shape[1]

    values, vectors = sample_eigh(x)
    # independent count from the sample eigenvalues: npca = fewest least-variance axes holding >= v,
    # pca = fewest largest-variance axes holding > v (scikit-learn's rule)
    ordered = values if reduction == "npca" else values[::-1]
    ratio = np.cumsum(ordered) / values.sum()
    reference_count = int(np.argmax(ratio >= variance if reduction == "npca" else ratio > variance)) + 1
    assert count == reference_count == EXPECTED_COUNT[reduction]
    if reduction == "pca":
        assert count == PCA(n_components=variance).fit(x).n_components_

    reference_axes = vectors[:, :count] if reduction == "npca" else vectors[:, -count:]
    np.testing.assert_allclose(axes.T @ axes, np.eye(count), atol=1e-10)
    assert np.linalg.norm(projector(axes) - projector(reference_axes)) < 1e-8

    # Ledoit-Wolf fitted by scikit-learn on the projected, centred data
    projected = (x - x.mean(0)) @ axes
    reference = LedoitWolf().fit(projected)
    assert float(g.shrinkage[0]) == pytest.approx(reference.shrinkage_, rel=1e-8, abs=1e-12)
    assert rel_err(np.diag(1 / precision), reference.covariance_) < 1e-6
    np.testing.assert_allclose(g.mean[0].numpy(), x.mean(0), rtol=1e-12, atol=1e-12)


def test_npca_and_pca_keep_complementary_ends():
    """npca with v and pca with 1 - v split the spectrum between them when the split is clean."""
    rng = np.random.default_rng(3)
    x = known_spectrum(rng, 20000, SPECTRUM)
    low = kept(fit_gaussian(batches_of(x), "npca", 0.05))[0]
    high = kept(fit_gaussian(batches_of(x), "pca", 0.95))[0]
    assert low.shape[1] + high.shape[1] == len(SPECTRUM) + 1  # they share exactly one axis
    assert np.linalg.matrix_rank(np.hstack([low, high]), tol=1e-8) == len(SPECTRUM)


# ---- batching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "npca", "pca"])
def test_result_independent_of_batching(reduction):
    rng = np.random.default_rng(11)
    x = correlated(rng, 300, 10, offset=50.0)
    one = fit_gaussian(batches_of(x), reduction, 0.05 if reduction == "npca" else 0.95)
    many = fit_gaussian(batches_of(x, [1, 7, 50, 242]), reduction, 0.05 if reduction == "npca" else 0.95)
    assert one.projection.shape == many.projection.shape
    np.testing.assert_allclose(many.mean.numpy(), one.mean.numpy(), rtol=1e-10, atol=0)
    np.testing.assert_allclose(many.precision.numpy(), one.precision.numpy(), rtol=1e-10, atol=0)
    np.testing.assert_allclose(many.shrinkage.numpy(), one.shrinkage.numpy(), rtol=1e-10, atol=1e-14)
    assert rel_err(precision_matrix(many), precision_matrix(one)) < 1e-10


# ---- Mahalanobis -----------------------------------------------------------------------------------


def test_mahalanobis_matches_scipy_with_ledoit_wolf_precision():
    rng = np.random.default_rng(5)
    x = correlated(rng, 200, 8)
    g = fit_gaussian(batches_of(x, [60, 140]), reduction="none")
    reference = LedoitWolf().fit(x)
    inverse = np.linalg.inv(reference.covariance_)  # the precision in the original coordinates

    points = np.vstack([x[:50], x.mean(0) + 4 * rng.normal(size=(100, 8)) * x.std(0)])
    got = g.mahalanobis(torch.from_numpy(points)[:, None, :])
    assert got.shape == (len(points), 1) and got.dtype == torch.float64
    want = [scipy_mahalanobis(p, reference.location_, inverse) for p in points]
    np.testing.assert_allclose(got[:, 0].numpy(), want, rtol=1e-6)


def test_mahalanobis_npca_matches_scipy_in_kept_subspace():
    rng = np.random.default_rng(6)
    x = known_spectrum(rng, 5000, SPECTRUM)
    g = fit_gaussian(batches_of(x), reduction="npca", variance=0.05)
    vi = precision_matrix(g)
    points = x.mean(0) + 3 * rng.normal(size=(150, len(SPECTRUM)))
    got = g.mahalanobis(torch.from_numpy(points.astype(np.float32))[:, None, :])[:, 0].numpy()
    want = [scipy_mahalanobis(p, x.mean(0), vi) for p in points.astype(np.float32).astype(np.float64)]
    np.testing.assert_allclose(got, want, rtol=1e-8)
    # only the low-variance axes count: moving along the largest axis changes nothing
    values, vectors = sample_eigh(x)
    shifted = points + 10 * vectors[:, -1]
    np.testing.assert_allclose(
        g.mahalanobis(torch.from_numpy(shifted)[:, None, :])[:, 0].numpy(),
        g.mahalanobis(torch.from_numpy(points)[:, None, :])[:, 0].numpy(),
        rtol=1e-6,
    )


# ---- groups (per-location) -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction, variance", [("none", 0.05), ("npca", 0.05), ("pca", 0.95)])
def test_groups_equal_separate_fits(reduction, variance):
    rng = np.random.default_rng(21)
    n, dim = 3000, 9
    spectra = [np.geomspace(0.01, 10, dim), np.linspace(1, 9, dim), np.geomspace(1, 1000, dim)]
    data = np.stack([known_spectrum(rng, n, s, offset=i + 1.0) for i, s in enumerate(spectra)], axis=1)
    grouped = fit_gaussian(batches_of(data, [1000, 2000]), reduction, variance)
    assert grouped.mean.shape == (3, dim) and grouped.precision.shape[0] == 3

    test_points = data[:40] + rng.normal(size=(40, 3, dim))
    distances = grouped.mahalanobis(torch.from_numpy(test_points)).numpy()
    counts = []
    for group in range(3):
        alone = fit_gaussian(batches_of(data[:, group, :]), reduction, variance)
        axes, precision = kept(grouped, group)
        alone_axes, alone_precision = kept(alone)
        counts.append(axes.shape[1])
        assert axes.shape == alone_axes.shape
        np.testing.assert_allclose(grouped.mean[group].numpy(), alone.mean[0].numpy(), rtol=1e-10)
        np.testing.assert_allclose(np.sort(precision), np.sort(alone_precision), rtol=1e-8)
        assert float(grouped.shrinkage[group]) == pytest.approx(float(alone.shrinkage[0]), rel=1e-8, abs=1e-14)
        assert rel_err(precision_matrix(grouped, group), precision_matrix(alone)) < 1e-8
        want = alone.mahalanobis(torch.from_numpy(test_points[:, group : group + 1, :]))[:, 0].numpy()
        np.testing.assert_allclose(distances[:, group], want, rtol=1e-8)
    if reduction != "none":
        assert len(set(counts)) > 1, "the spectra are chosen so that groups keep different counts (padding)"


def test_groups_decomposed_in_chunks_equal_one_decomposition(monkeypatch):
    """The eigendecompositions run EIGH_GROUPS groups at a time on a thread pool; chunks that keep
    different counts are padded to one width. Same result as all groups at once."""
    import gaussad.gaussian.statistics as gaussian

    rng = np.random.default_rng(5)
    spectra = [np.geomspace(0.01, 10, 6), np.linspace(1, 9, 6), np.geomspace(1, 1000, 6)] * 3
    data = np.stack([known_spectrum(rng, 400, s, offset=i) for i, s in enumerate(spectra)], axis=1)  # 9 groups
    whole = fit_gaussian(batches_of(data), "npca", 0.05)
    monkeypatch.setattr(gaussian, "EIGH_GROUPS", 2)
    chunked = fit_gaussian(batches_of(data), "npca", 0.05)
    assert chunked.projection.shape == whole.projection.shape
    points = torch.from_numpy(data[:30] + rng.normal(size=data[:30].shape))
    np.testing.assert_allclose(chunked.mahalanobis(points).numpy(), whole.mahalanobis(points).numpy(), rtol=1e-10)
    np.testing.assert_allclose(chunked.shrinkage.numpy(), whole.shrinkage.numpy(), rtol=1e-10)


# What float32 can promise for a distance along the least-variance axes: a point's components along
# them come out of float32 sums of terms √(λmax/λmin) times larger (cancellation), each rounded to
# ε = 2⁻²⁴, and the kept eigenvalues come from float32 sums of n outer products. Measured over 40
# seeds and both thread counts, λmax/λmin = 10: at most 1.2e-5 (AVX-512 MKL here; AVX2 sums in
# another order, and the 1e-5 this test once asked failed on one machine and passed on another);
# 1e3: 2.7e-5; 1e5: 2.6e-4. The bound: 8 ε √(λmax/λmin) √n (rounding errors of n terms grow as √n),
# 3.4e-5 and 3.4e-4 for the two spectra tested.
def float32_distance_tolerance(eigenvalues: np.ndarray, n: int) -> float:
    return 8 * 2.0**-24 * np.sqrt(eigenvalues.max() / eigenvalues.min()) * np.sqrt(n)


@pytest.mark.parametrize("smallest", [1.0, 0.01])
def test_float32_sums_and_axes_keep_the_distances(smallest):
    """Per-position Gaussians are fitted with float32 outer-product sums and [G, D, k] axes:
    distances as the float64 fit's, within what float32 can promise for the spectrum."""
    rng = np.random.default_rng(8)
    spectrum = np.geomspace(smallest, 10, 12)
    data = np.stack([known_spectrum(rng, 500, spectrum, offset=i) for i in range(4)], axis=1)
    exact = fit_gaussian(batches_of(data), "npca", 0.05)
    compact = fit_gaussian(batches_of(data), "npca", 0.05, dtype=torch.float32)
    assert compact.projection.dtype == torch.float32 and compact.mean.dtype == torch.float64
    points = torch.from_numpy(data[:50] + rng.normal(size=data[:50].shape))
    np.testing.assert_allclose(compact.mahalanobis(points).numpy(), exact.mahalanobis(points).numpy(),
                               rtol=float32_distance_tolerance(spectrum, len(data)))


# ---- errors ----------------------------------------------------------------------------------------


def test_unknown_reduction():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="unknown reduction 'ica'"):
        fit_gaussian(batches_of(x), reduction="ica")


@pytest.mark.parametrize("variance", [0.0, -0.1, 1.5])
@pytest.mark.parametrize("reduction", ["npca", "pca"])
def test_variance_out_of_range(reduction, variance):
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"variance fraction must be in \(0, 1\]"):
        fit_gaussian(batches_of(x), reduction=reduction, variance=variance)


def test_variance_one_keeps_all_axes():
    x = np.random.default_rng(0).normal(size=(50, 4))
    for reduction in ("npca", "pca"):
        assert kept(fit_gaussian(batches_of(x), reduction, 1.0))[0].shape == (4, 4)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_samples(n):
    x = np.random.default_rng(0).normal(size=(n, 3))
    source = batches_of(x) if n else (lambda: iter(()))
    with pytest.raises(ValueError, match=f"at least 2 samples, got {n}"):
        fit_gaussian(source, reduction="none")


@pytest.mark.parametrize("reduction", ["none", "npca", "pca"])
def test_identical_samples(reduction):
    x = np.tile(np.arange(4.0), (20, 1))
    with pytest.raises(ValueError, match="zero variance"):
        fit_gaussian(batches_of(x, [5, 15]), reduction=reduction, variance=0.05 if reduction == "npca" else 0.95)


# ---- the kept count at an exact boundary -----------------------------------------------------------


def test_pca_count_at_exact_boundary_follows_sklearn():
    """pca keeps the fewest largest axes holding MORE than v: [19, 1] with v = 0.95 keeps both (as sklearn)."""
    from gaussad.gaussian.statistics import kept_counts

    assert kept_counts(torch.tensor([[1.0, 19.0]], dtype=torch.float64), "pca", 0.95).tolist() == [2]


def test_npca_count_at_exact_boundary_is_at_least_v():
    from gaussad.gaussian.statistics import kept_counts

    assert kept_counts(torch.tensor([[1.0, 3.0, 16.0]], dtype=torch.float64), "npca", 0.05).tolist() == [1]
