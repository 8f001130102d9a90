import numpy as np
import pytest
import torch

from inspectd.core.errors import ConfigError, DataError
from inspectd.models.patchcore.knn import NearestNeighbourIndex

faiss = pytest.importorskip("faiss")


def _data(n_bank: int, n_query: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # An offset from the origin, like real (post-ReLU) features, makes the norm expansion work.
    bank = torch.randn(n_bank, dim, generator=g) + 2.0
    queries = torch.randn(n_query, dim, generator=g) + 2.0
    return bank, queries


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("n_query", [7, 3000])  # faiss: direct path below 20 queries, BLAS above
def test_faiss_and_torch_backends_agree(k: int, n_query: int) -> None:
    bank, queries = _data(5000, n_query, 96)
    fd, fi = NearestNeighbourIndex("faiss").fit(bank).search(queries, k)
    td, ti = NearestNeighbourIndex("torch").fit(bank).search(queries, k)
    assert fd.shape == td.shape == fi.shape == ti.shape == (n_query, k)
    assert fd.dtype == td.dtype == torch.float32 and fi.dtype == ti.dtype == torch.int64
    # Float32 rounding differs between the two (and from float64) at the ~1e-6 level, so rows
    # whose true neighbour order is decided by less than that (near-ties) are left out.
    exact = torch.cdist(queries.double(), bank.double()).pow(2)
    ref_d, ref_i = exact.topk(k + 1, dim=1, largest=False)
    clear = ((ref_d[:, 1:] - ref_d[:, :-1]) > 1e-5 * ref_d[:, 1:]).all(1)
    assert clear.float().mean() > 0.99
    assert torch.equal(fi[clear], ti[clear])
    assert torch.equal(ti[clear], ref_i[clear, :k])
    torch.testing.assert_close(td, fd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(td.double(), ref_d[:, :k], rtol=1e-4, atol=1e-3)
    assert bool((td[:, 1:] >= td[:, :-1]).all())  # ascending


def test_numpy_and_float16_inputs() -> None:
    bank, queries = _data(1000, 50, 32)
    index = NearestNeighbourIndex("torch").fit(bank.numpy())
    d16, i16 = index.search(queries.half(), 3)
    d32, i32 = index.search(queries.half().float().numpy(), 3)
    assert torch.equal(i16, i32) and torch.equal(d16, d32)
    assert index.size == 1000


def test_auto_picks_faiss_else_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspectd.models.patchcore.knn as knn

    assert NearestNeighbourIndex().backend == "faiss"
    assert NearestNeighbourIndex("torch").backend == "torch"
    monkeypatch.setattr(knn, "faiss", None)  # as if faiss were not installed
    assert NearestNeighbourIndex("auto").backend == "torch"
    with pytest.raises(ConfigError, match="faiss"):
        NearestNeighbourIndex("faiss")


def test_torch_backend_chunks_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspectd.models.patchcore.knn as knn

    bank, queries = _data(2000, 333, 16)
    whole = NearestNeighbourIndex("torch").fit(bank).search(queries, 4)
    monkeypatch.setattr(knn, "_MAX_CHUNK_ELEMENTS", 2000 * 10)  # 10 queries per chunk
    chunked = NearestNeighbourIndex("torch").fit(bank).search(queries, 4)
    # Same neighbours; distances only close: BLAS may pick another kernel (and summation
    # order) for a 10-row product than for a 333-row one, depending on the CPU.
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_k_larger_than_bank_raises(backend: str) -> None:
    # Documented choice: asking for more neighbours than the bank holds is a ConfigError
    # (callers clamp k to index.size), never silently padded with -1 indices.
    bank, queries = _data(5, 3, 8)
    index = NearestNeighbourIndex(backend).fit(bank)
    assert index.size == 5
    assert index.search(queries, 5)[1].shape == (3, 5)
    with pytest.raises(ConfigError, match="bank holds 5"):
        index.search(queries, 6)
    with pytest.raises(ConfigError):
        index.search(queries, 0)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError):
        NearestNeighbourIndex("annoy")
    with pytest.raises(ConfigError):
        NearestNeighbourIndex("torch").search(np.zeros((1, 4), np.float32), 1)  # before fit
    index = NearestNeighbourIndex("torch").fit(torch.zeros(10, 4))
    with pytest.raises(DataError):
        index.search(torch.zeros(2, 5), 1)
    with pytest.raises(DataError):
        index.search(torch.zeros(4), 1)
    for backend in ("faiss", "torch"):  # no queries: empty results, not an error
        dist, idx = (
            NearestNeighbourIndex(backend).fit(torch.zeros(10, 4)).search(torch.zeros(0, 4), 3)
        )
        assert dist.shape == idx.shape == (0, 3)
