"""Large-model machinery: the disk cache, low-memory bases and the checked randomized SVD."""

import pytest
import torch
from torch import nn

import rankcut
from rankcut import LoaderTask
from rankcut.bases import BasisStore
from rankcut.cache import DiskCache, digest
from rankcut.joint import LossAware
from rankcut.linalg import RandomizedSVDError, Spectrum

from toy_models import ToyTask, cnn_factory


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(4, 64, generator=torch.Generator().manual_seed(2)))


def test_randomized_svd_finds_the_leading_triplets():
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(120, 80, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(80, 80, generator=generator, dtype=torch.float64)).Q
    matrix = left @ torch.diag(0.8 ** torch.arange(80, dtype=torch.float64)) @ right.T  # decaying spectrum
    exact = Spectrum.of(matrix)
    partial = Spectrum.randomized(matrix, 20)
    assert not partial.complete and partial.max_rank == 20 and exact.complete
    torch.testing.assert_close(partial.S, exact.S[:, :20], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(partial.energy(), exact.energy()[:20], rtol=1e-10, atol=1e-12)
    assert partial.relative_error(20) == pytest.approx(exact.relative_error(20), rel=1e-8)
    assert partial.residual < 1e-6
    A, B = partial.factors(10)
    exact_A, exact_B = exact.factors(10)
    torch.testing.assert_close(A @ B, exact_A @ exact_B, rtol=1e-8, atol=1e-10)


def test_randomized_svd_refuses_unconverged_triplets():
    matrix = torch.randn(200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # flat spectrum
    with pytest.raises(RandomizedSVDError, match="residual"):
        Spectrum.randomized(matrix, 50, oversample=0, power_iterations=0)


def test_disk_cache_round_trip_and_bad_files(tmp_path):
    cache = DiskCache(tmp_path)
    key = digest([torch.ones(3)], "label")
    assert key != digest([torch.ones(3)], "other") and key != digest([torch.ones(3, dtype=torch.float64)], "label")
    assert cache.load("bases", key) is None
    cache.save("bases", key, {"x": torch.arange(4.0)})
    assert torch.equal(cache.load("bases", key)["x"], torch.arange(4.0))
    (tmp_path / "bases" / f"{key}.safetensors").write_bytes(b"garbage")
    assert cache.load("bases", key) is None, "an unreadable entry is a miss, not a crash"


def test_second_run_reads_every_basis_from_the_cache(tmp_path):
    first, report = rankcut.compress(mlp(), "budget:params=0.4", cache_dir=tmp_path, progress=False)
    assert report.plan.meta["bases"]["computed"] == 3
    _, again = rankcut.compress(mlp(), "budget:params=0.6", cache_dir=tmp_path, progress=False)
    assert again.plan.meta["bases"]["computed"] == 0 and again.plan.meta["bases"]["cache_hits"] == 3
    third, same = rankcut.compress(mlp(), "budget:params=0.4", progress=False)
    assert [layer.rank for layer in same.plan.layers] == [layer.rank for layer in report.plan.layers]
    assert torch.equal(outputs(first), outputs(third))


def test_changed_weights_miss_the_cache(tmp_path):
    rankcut.compress(mlp(), "fixed:0.5", cache_dir=tmp_path, progress=False)
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    _, report = rankcut.compress(model, "fixed:0.5", cache_dir=tmp_path, progress=False)
    assert report.plan.meta["bases"]["computed"] == 1 and report.plan.meta["bases"]["cache_hits"] == 2


def test_low_memory_keeps_vectors_on_disk_and_gives_the_same_model():
    model = mlp()
    reference, _ = rankcut.compress(model, "energy:0.9", progress=False)
    store = BasisStore(low_memory=True)
    inventory = rankcut.scan(model, store=store)
    spectrum = inventory.candidates[0].basis()
    assert spectrum._U is None and spectrum._Vh is None, "singular vectors must not stay in memory"
    compressed, _ = rankcut.compress(model, "energy:0.9", low_memory=True, inplace=True, progress=False)
    assert compressed is model
    assert torch.equal(outputs(compressed), outputs(reference))


def decaying_mlp() -> nn.Module:
    """``mlp()`` with weights whose spectra decay like trained ones (σ_i = 0.8^i), where randomized SVD converges."""
    model = mlp()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            m, n = layer.weight.shape
            left = torch.linalg.qr(torch.randn(m, min(m, n), generator=generator)).Q
            right = torch.linalg.qr(torch.randn(n, min(m, n), generator=generator)).Q
            layer.weight.copy_(left @ torch.diag(0.8 ** torch.arange(min(m, n)).float()) @ right.T)
    return model


def test_randomized_layers_never_get_ranks_above_the_computed_components():
    _, report = rankcut.compress(decaying_mlp(), "fixed:0.9", randomized_above=4000, progress=False)
    bases = report.plan.meta["bases"]
    assert bases["randomized"] == 2 and bases["randomized_fallbacks"] == 0  # 96x64 and 48x96; 10x48 is exact
    assert bases["randomized_worst_residual"] < 1e-2
    layers = {layer.name: layer for layer in report.plan.layers}
    assert layers["0"].rank is None and "randomized SVD" in layers["0"].reason
    assert layers["4"].rank is not None
    compressed, half = rankcut.compress(decaying_mlp(), "fixed:0.4", randomized_above=4000, progress=False)
    reference, exact = rankcut.compress(decaying_mlp(), "fixed:0.4", progress=False)
    assert [layer.rank for layer in half.plan.layers] == [layer.rank for layer in exact.plan.layers]
    torch.testing.assert_close(outputs(compressed), outputs(reference), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="partial"):
        rankcut.compress(decaying_mlp(), "evbmf", randomized_above=4000, progress=False)


def test_unconverged_randomized_svd_falls_back_to_the_exact_one():
    _, report = rankcut.compress(mlp(), "fixed:0.4", randomized_above=4000, progress=False)  # flat random spectra
    assert report.plan.meta["bases"]["randomized_fallbacks"] == 2 and report.plan.meta["bases"]["randomized"] == 0
    assert all(layer.rank is not None for layer in report.plan.layers)


def test_a_cache_hit_gives_the_plan_of_a_run_without_the_cache(tmp_path):
    """The cache holds statistics and measurements, not a head start: a run that hits it takes the path of a
    run without it, compact and lossless alike and in any order, with fewer probe passes."""
    selector = {"calibration_samples": 64, "batch_size": 16, "progress": False}
    task = ToyTask()

    def plan(mode: str, cache_dir):
        chosen = LossAware(mode, 0.5 if mode == "lossless" else None, **selector)
        return rankcut.compress(cnn_factory(), chosen, task=task, cache_dir=cache_dir, progress=False)[1].plan

    def layers(made) -> list:
        return [(layer.rank, layer.components, layer.reason) for layer in made.layers]

    fresh = {mode: plan(mode, None) for mode in ("compact", "lossless")}
    cached_before = set()
    for mode, expected in (("compact", "miss"), ("compact", "hit"), ("lossless", "hit"), ("lossless", "hit"),
                           ("compact", "hit")):
        cached = plan(mode, tmp_path)
        assert cached.meta["selection"]["statistics_cache"] == expected
        assert layers(cached) == layers(fresh[mode])
        if mode in cached_before:  # its measurements are in the cache
            assert (cached.meta["selection"]["probe_measurements"]
                    < fresh[mode].meta["selection"]["probe_measurements"])
        cached_before.add(mode)


def test_the_cache_keys_the_statistics_by_each_layers_basis(tmp_path):
    """Statistics are taken in each layer's basis: an svd run's cache entry is not a whitened-svd run's (whose
    key also holds the inputs' Gram matrices)."""
    task = ToyTask()

    def plan(decomposition: str, cache_dir):
        chosen = LossAware("compact", calibration_samples=64, batch_size=16, progress=False)
        return rankcut.compress(cnn_factory(), chosen, task=task, cache_dir=cache_dir, decomposition=decomposition,
                                progress=False)[1].plan

    def layers(made) -> list:
        return [(layer.rank, layer.components, layer.reason) for layer in made.layers]

    assert plan("svd", tmp_path).meta["selection"]["statistics_cache"] == "miss"
    cached = plan("whitened-svd", tmp_path)
    assert cached.meta["selection"]["statistics_cache"] == "miss"
    assert layers(cached) == layers(plan("whitened-svd", None))
    assert plan("whitened-svd", tmp_path).meta["selection"]["statistics_cache"] == "hit"


def regression_task(loss) -> LoaderTask:
    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 64, generator=generator), torch.randn(16, 10, generator=generator)) for _ in range(4)]
    return LoaderTask(batches[:3], batches[3:], lambda model, batch: loss(model(batch[0]), batch[1]))


def test_statistics_of_another_loss_function_are_not_reused(tmp_path):
    selector = {"calibration_samples": 48, "batch_size": 16, "progress": False}
    for loss, expected in ((nn.functional.mse_loss, "miss"), (nn.functional.mse_loss, "hit"),
                           (nn.functional.l1_loss, "miss")):
        _, report = rankcut.compress(mlp(), LossAware("lossless", 0.6, **selector), task=regression_task(loss),
                                     cache_dir=tmp_path, progress=False)
        assert report.plan.meta["selection"]["statistics_cache"] == expected


def test_loss_aware_selection_refuses_partial_spectra():
    task = regression_task(nn.functional.mse_loss)
    with pytest.raises(ValueError, match="partial randomized SVD"):
        rankcut.compress(decaying_mlp(), LossAware("compact", calibration_samples=48, batch_size=16, progress=False),
                         task=task, randomized_above=4000, progress=False)
