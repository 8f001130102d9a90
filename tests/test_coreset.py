import numpy as np
import pytest
import torch

from inspectd.core.errors import ConfigError, DataError
from inspectd.models.patchcore.coreset import (
    ApproximateGreedyCoreset,
    ExactGreedyCoreset,
    IdentitySampler,
    RandomSampler,
    covering_radius,
    num_selected,
    project_features,
)


def clustered(n: int, dim: int = 192, clusters: int = 30, seed: int = 0) -> torch.Tensor:
    """Gaussian clusters of very different sizes, each on a low-rank subspace, plus outliers."""
    g = np.random.default_rng(seed)
    sizes = np.maximum((g.dirichlet(np.full(clusters, 0.7)) * n * 0.99).astype(int), 3)
    parts = []
    for size in sizes:
        rank = int(g.integers(4, 24))
        basis = g.normal(0, g.uniform(0.2, 1.5) / np.sqrt(rank), (rank, dim))
        noise = g.normal(0, 0.05, (size, dim))
        parts.append(g.normal(0, 3.0, dim) + g.normal(0, 1, (size, rank)) @ basis + noise)
    x = np.concatenate(parts)
    outliers = g.normal(0, 1.5, (n - len(x), dim)) + x[g.integers(0, len(x), n - len(x))]
    x = np.concatenate([x, outliers])[:n]
    g.shuffle(x)
    return torch.from_numpy(x.astype(np.float32))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return clustered(12_000)


def test_approximate_coreset_beats_random_sampling_radius(data: torch.Tensor) -> None:
    proj = project_features(data, 128, seed=0)
    greedy = ApproximateGreedyCoreset(0.05, seed=0).run(data)
    rand = RandomSampler(0.05, seed=0).run(data)
    assert len(greedy) == len(rand) == 600
    assert covering_radius(proj, greedy) < 0.8 * covering_radius(proj, rand)


def test_approximate_coreset_within_1_5x_of_exact_greedy(data: torch.Tensor) -> None:
    # Small cells (many boundaries) make this a harder test than the default chunk_size.
    for chunk_size in (1024, 8192):
        approx = ApproximateGreedyCoreset(0.08, seed=0, chunk_size=chunk_size).run(data)
        exact = ExactGreedyCoreset(0.08, seed=0).run(data)
        proj = project_features(data, 128, seed=0)  # the space both samplers work in
        r_approx, r_exact = covering_radius(proj, approx), covering_radius(proj, exact)
        assert len(approx) == len(exact) == 960
        assert r_approx <= 1.5 * r_exact, (chunk_size, r_approx, r_exact)


def test_greedy_matches_exact_when_everything_fits_one_cell() -> None:
    x = clustered(3000, dim=64, seed=1)
    approx = ApproximateGreedyCoreset(0.05, seed=3, chunk_size=8192).run(x)
    exact = ExactGreedyCoreset(0.05, seed=3).run(x)
    assert torch.equal(approx, exact)


@pytest.mark.parametrize(
    "sampler",
    [
        lambda: ApproximateGreedyCoreset(0.05, seed=7, chunk_size=2048),
        lambda: ExactGreedyCoreset(0.05, seed=7),
        lambda: RandomSampler(0.05, seed=7),
    ],
)
def test_samplers_are_reproducible_and_seeded(data: torch.Tensor, sampler) -> None:
    a, b = sampler().run(data), sampler().run(data)
    assert torch.equal(a, b)
    other = type(sampler())(0.05, seed=8).run(data)
    assert not torch.equal(a, other)


def test_k_from_ratio_and_max_size(data: torch.Tensor) -> None:
    assert num_selected(1000, 0.1) == 100
    assert num_selected(1000, 0.0001) == 1
    assert num_selected(1000, 0.1, max_size=40) == 40
    assert len(ApproximateGreedyCoreset(0.1, max_size=123).run(data)) == 123
    assert len(ExactGreedyCoreset(0.5, max_size=7).run(data)) == 7
    assert len(RandomSampler(0.01).run(data)) == 120
    assert torch.equal(ApproximateGreedyCoreset(1.0).run(data[:50]), torch.arange(50))
    with pytest.raises(ConfigError):
        ApproximateGreedyCoreset(0.0)
    with pytest.raises(ConfigError):
        RandomSampler(0.1, max_size=0)


def test_identity_sampler_returns_all_rows(data: torch.Tensor) -> None:
    idx = IdentitySampler().run(data)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.arange(len(data)))


def test_indices_are_unique_int64_even_with_duplicate_rows() -> None:
    x = clustered(2000, dim=32, seed=2)
    x = torch.cat([x[:100]] * 30)  # only 100 distinct rows, 3000 in all
    for sampler in (ApproximateGreedyCoreset(0.1, chunk_size=512), ExactGreedyCoreset(0.1)):
        idx = sampler.run(x)
        assert idx.dtype == torch.int64 and idx.ndim == 1 and len(idx) == 300
        assert len(torch.unique(idx)) == 300
        assert 0 <= int(idx.min()) and int(idx.max()) < len(x)
        assert covering_radius(x, idx) < 1e-3  # all 100 distinct rows got picked first


def test_float16_input_and_progress(data: torch.Tensor) -> None:
    calls: list[tuple[int, int]] = []
    half = ApproximateGreedyCoreset(0.05, seed=0).run(
        data.half(), progress=lambda done, total: calls.append((done, total))
    )
    full = ApproximateGreedyCoreset(0.05, seed=0).run(data.half().float())
    assert torch.equal(half, full)
    assert calls[-1] == (600, 600) and len(calls) > 10
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:], strict=False))


def test_covering_radius_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(3000, 16, generator=g), torch.arange(0, 3000, 7)
    expected = torch.cdist(x.double(), x[idx].double()).min(1).values.max()
    assert covering_radius(x, idx, chunk=100) == pytest.approx(float(expected), rel=1e-4)


def test_non_finite_features_raise() -> None:
    x = torch.randn(500, 8)
    x[3, 2] = float("nan")
    with pytest.raises(DataError):
        ApproximateGreedyCoreset(0.1).run(x)


def test_patch_embedding_border_zeros_shrinks_only_the_edge_and_old_artifacts_keep_inside():
    """`border: zeros` (the default) averages the zero padding at the map's edge; artifacts
    fitted before the setting existed have no `border` and keep averaging inside only."""
    import torch

    from inspectd.models.patchcore.model import PatchCore, embed_patches

    feats = {"a": torch.ones(1, 2, 6, 6), "b": torch.ones(1, 3, 3, 3)}
    zeros = embed_patches(feats, ["a", "b"], 3, 1024, "zeros")
    inside = embed_patches(feats, ["a", "b"], 3, 1024, "inside")
    assert zeros.shape == inside.shape == (1, 5, 6, 6)
    assert torch.equal(inside, torch.ones_like(inside))
    assert torch.equal(zeros[0, 0, 1:-1, 1:-1], torch.ones(4, 4))  # inside: untouched
    assert zeros[0, 0, 0, 0].item() == pytest.approx(4 / 9)  # a corner: 4 of 9 cells
    assert zeros[0, 0, 0, 2].item() == pytest.approx(6 / 9)  # an edge: 6 of 9

    params = {"layers": ["a", "b"], "neighbourhood": 3, "target_dim": 1024,
              "num_neighbours": 1, "image_score": "max", "topk": 1}
    old = PatchCore(torch.zeros(4, 5), params)
    assert torch.equal(old.embed(feats), inside)
    assert torch.equal(PatchCore(torch.zeros(4, 5), {**params, "border": "zeros"}).embed(feats),
                       zeros)
