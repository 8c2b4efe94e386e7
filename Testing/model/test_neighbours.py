"""Tests of GaussianSVRLib.neighbours: every backend returns the exact k nearest centres."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from GaussianSVRLib.model import neighbours
from GaussianSVRLib.model.neighbours import BACKENDS, choose_backend, knn

REPO = Path(__file__).resolve().parents[2]


def reference_distances(database: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest squared distances (Q, k), ascending, in float64 by explicit differences."""
    dist = (queries.double()[:, None, :] - database.double()[None, :, :]).square().sum(-1)
    return dist.topk(k, dim=1, largest=False).values


def assert_exact(database: torch.Tensor, queries: torch.Tensor, indices: torch.Tensor, k: int) -> None:
    """Same neighbour sets as brute force, allowing ties: distinct indices whose sorted distances
    equal the k smallest."""
    assert indices.shape == (len(queries), k)
    assert indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < len(database)
    assert (indices.sort(1).values.diff(dim=1) > 0).all(), "a row repeats an index"
    found = (database.double()[indices] - queries.double()[:, None, :]).square().sum(-1).sort(1).values
    expected = reference_distances(database, queries, k)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def brain_like(n: int, seed: int) -> torch.Tensor:
    """Centres (n, 3) in an ellipsoid, denser in an outer shell, in LPS-like world coordinates."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n, 3, generator=g)
    radius = torch.rand(n, 1, generator=g) ** (1 / 3)
    radius[: n // 3] = 0.9 + 0.1 * radius[: n // 3]
    points = points / points.norm(dim=1, keepdim=True) * radius
    return points * torch.tensor([50.0, 40.0, 35.0]) + torch.tensor([-20.0, 130.0, 40.0])


@pytest.fixture(params=[*BACKENDS, "grid/torch"])
def backend(request, monkeypatch) -> str:
    """Every backend; "grid/torch" is the grid's plain-torch search on the CPU, where the fused
    kernel (grid_kernel.py) is the default."""
    name, _, kernel = request.param.partition("/")
    if kernel:
        monkeypatch.setenv("GAUSSIANSVR_KERNEL", kernel)
    return name


@pytest.fixture(scope="module")
def cloud() -> tuple[torch.Tensor, torch.Tensor]:
    database = brain_like(2000, seed=0)
    g = torch.Generator().manual_seed(1)
    # A plane of pixels through the cloud plus a few points well outside it.
    u, v = torch.meshgrid(torch.arange(-60.0, 60.0, 4.0), torch.arange(-50.0, 50.0, 4.0), indexing="ij")
    plane = torch.stack([u.ravel(), v.ravel(), 3.0 * torch.ones(u.numel())], 1) + database.mean(0)
    outside = database.mean(0) + 200.0 * torch.randn(20, 3, generator=g)
    return database, torch.cat([plane, outside])


@pytest.mark.parametrize("k", [1, 50])
def test_backends_match_brute_force(cloud, backend: str, k: int) -> None:
    database, queries = cloud
    assert_exact(database, queries, knn(database, queries, k, backend), k)


def test_small_chunks_give_the_same_result(cloud, backend: str, monkeypatch) -> None:
    database, queries = cloud
    monkeypatch.setattr(neighbours, "MAX_CHUNK_BYTES", 200_000)
    monkeypatch.setattr(neighbours, "_GRID_CHUNK_SLOTS", 5_000)
    assert_exact(database, queries, knn(database, queries, 8, backend), 8)


def test_queries_far_outside_get_k_indices(backend: str) -> None:
    database = brain_like(500, seed=2)
    queries = torch.tensor([[5000.0, 0.0, 0.0], [0.0, -3000.0, 900.0], [-1e4, 1e4, 1e4]])
    assert_exact(database, queries, knn(database, queries, 20, backend), 20)


def test_awkward_databases(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    flat = torch.cat([torch.rand(400, 2, generator=g) * 80.0, torch.zeros(400, 1)], 1)
    duplicates = torch.cat([torch.zeros(30, 3), torch.rand(30, 3, generator=g)])
    two_clusters = torch.cat([torch.randn(200, 3, generator=g), 500.0 + torch.randn(10, 3, generator=g)])
    queries = torch.rand(100, 3, generator=g) * 100.0 - 10.0
    for database, k in ((flat, 12), (duplicates, 40), (two_clusters, 25), (two_clusters[:25], 25)):
        assert_exact(database, queries, knn(database, queries, k, backend), k)


def test_dtype_and_device_of_the_result(backend: str) -> None:
    database = brain_like(300, seed=4).double()
    queries = brain_like(40, seed=5).double().requires_grad_()
    indices = knn(database, queries, 5, backend)
    assert indices.device == queries.device
    assert_exact(database, queries.detach(), indices, 5)
    assert knn(database, queries[:0], 5, backend).shape == (0, 5)


@pytest.mark.parametrize(
    ("database", "queries", "k", "message"),
    [
        (torch.zeros(10, 3), torch.zeros(4, 3), 11, "1 <= k <= number of database points"),
        (torch.zeros(10, 3), torch.zeros(4, 3), 0, "1 <= k"),
        (torch.zeros(10, 2), torch.zeros(4, 3), 2, "database must have shape"),
        (torch.zeros(10, 3), torch.zeros(4, 3, dtype=torch.int64), 2, "floating-point"),
    ],
)
def test_bad_arguments_raise_value_error(database, queries, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        knn(database, queries, k)


def test_unknown_backend_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown k-NN backend"):
        knn(torch.zeros(10, 3), torch.zeros(4, 3), 2, backend="annoy")


def test_auto_picks_the_rule_of_each_device(cloud, monkeypatch) -> None:
    """The rule (measured in docs/benchmarks.md): the grid on the CPU (its fused kernel; the k-d tree
    without numba); on CUDA faiss only where it has
    GPU support, else brute force in torch; torch on any other device."""
    database, queries = cloud
    assert choose_backend(torch.device("cpu")) == "grid"
    monkeypatch.setenv("GAUSSIANSVR_KERNEL", "torch")
    assert choose_backend(torch.device("cpu")) == "kdtree"
    assert choose_backend("mps") == "torch"
    with_gpus = types.SimpleNamespace(get_num_gpus=lambda: 1)
    cpu_only = types.SimpleNamespace(get_num_gpus=lambda: 0)
    for faiss, expected in (
        (with_gpus, "faiss"),
        (cpu_only, "torch"),
        (types.SimpleNamespace(), "torch"),
        (None, "torch"),
    ):
        monkeypatch.setattr(neighbours, "_import_faiss", lambda faiss=faiss: faiss)
        assert choose_backend("cuda") == expected, faiss
    monkeypatch.undo()
    assert_exact(database, queries, knn(database, queries, 10), 10)


def test_missing_faiss_falls_back(cloud, monkeypatch) -> None:
    database, queries = cloud
    monkeypatch.setattr(neighbours, "_import_faiss", lambda: None)
    with pytest.warns(UserWarning, match="faiss is not installed"):
        indices = knn(database, queries, 6, backend="faiss")
    assert_exact(database, queries, indices, 6)


def test_faiss_is_imported_lazily_and_keeps_torch_threads() -> None:
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from GaussianSVRLib.model.neighbours import knn\n"
        "assert 'faiss' not in sys.modules, 'faiss imported with the module'\n"
        "knn(torch.rand(50, 3), torch.rand(5, 3), 3, backend='faiss')\n"
        "assert 'faiss' in sys.modules\n"
        "print(torch.get_num_threads())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"
