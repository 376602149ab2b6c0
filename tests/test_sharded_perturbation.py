import pytest
import torch

from lightning_es import EvolutionStrategy, FullRankPerturbation, GaussianNoise, ShardedPerturbation
from lightning_es.engine.perturbations import ShardedNoise, ShardLayout


def layouts_for(shapes: dict, world: int, rank: int) -> dict:
    """ZeRO-3's layout: the flattened tensor padded to a multiple of ``world``, rank r holding the r-th piece."""
    layouts = {}
    for name, shape in shapes.items():
        size = -(-torch.Size(shape).numel() // world)
        layouts[name] = ShardLayout(torch.Size(shape), start=rank * size, size=size)
    return layouts


SHAPES = {"w": (5, 3), "b": (5,)}  # 15 and 5 elements: both padded over 2 ranks


def test_slices_of_the_noise_rebuild_the_full_noise_with_zero_padding():
    full = GaussianNoise()
    pieces = {name: [] for name in SHAPES}
    for rank in range(2):
        layouts = layouts_for(SHAPES, 2, rank)
        noise = ShardedNoise(layouts)
        for name, layout in layouts.items():
            pieces[name].append(noise.sample(7, name, torch.Size([layout.size]), "cpu"))
    for name, shape in SHAPES.items():
        joined = torch.cat(pieces[name])
        numel = torch.Size(shape).numel()
        assert torch.equal(joined[:numel].view(shape), full.sample(7, name, torch.Size(shape), "cpu"))
        assert torch.count_nonzero(joined[numel:]) == 0


def test_sharded_steps_equal_the_unsharded_step():
    torch.manual_seed(0)
    full = {name: torch.nn.Parameter(torch.randn(shape)) for name, shape in SHAPES.items()}
    fitness = torch.randn(6)
    unsharded = EvolutionStrategy(FullRankPerturbation(full, sigma=0.1), population_size=6, learning_rate=0.05, seed=3)
    unsharded.step(0, fitness)
    expected = {name: p.detach().clone() for name, p in full.items()}
    torch.manual_seed(0)
    start = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    pieces = {name: [] for name in SHAPES}
    for rank in range(2):
        layouts = layouts_for(SHAPES, 2, rank)
        shards = {name: torch.nn.Parameter(torch.zeros(layout.size)) for name, layout in layouts.items()}
        perturbation = ShardedPerturbation(shards, layouts, sigma=0.1)
        with torch.no_grad():
            for name, piece in perturbation.local_tensors(start).items():
                shards[name].copy_(piece)
        perturbation.master.sync_from_model()
        es = EvolutionStrategy(perturbation, population_size=6, learning_rate=0.05, seed=3)
        es.step(0, fitness)
        for name, shard in shards.items():
            pieces[name].append(shard.detach())
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        torch.testing.assert_close(torch.cat(pieces[name])[:numel].view(shape), expected[name], rtol=0, atol=1e-6)


def test_relative_scales_of_a_padded_slice_ignore_its_padding():
    """DeepSpeed leaves a slice's padding uninitialised: it is zeroed, and the scales are the whole tensor's."""
    from lightning_es import relative_scales

    torch.manual_seed(0)
    full = {"w": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.nn.Parameter(torch.randn(5))}
    expected = relative_scales(FullRankPerturbation(full, sigma=0.1))
    layouts = {name: ShardLayout(p.shape, start=0, size=p.numel() + 3) for name, p in full.items()}  # 3 padding
    shards = {name: torch.nn.Parameter(torch.full((layout.size,), float("nan"))) for name, layout in layouts.items()}
    with torch.no_grad():
        for name, p in full.items():
            shards[name][: p.numel()] = p.detach().reshape(-1)
    perturbation = ShardedPerturbation(shards, layouts, sigma=0.1)
    assert all(torch.count_nonzero(shard[-3:]) == 0 for shard in shards.values())
    scales = relative_scales(perturbation)
    assert torch.equal(scales["w"], expected["w"])
    assert torch.equal(scales["b"][:5], expected["b"]) and torch.count_nonzero(scales["b"][5:]) == 0


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])  # a whole tensor, and a last slice with padding
def test_sharded_drift_measures_the_weights_as_the_model_holds_them(world, rank):
    """bf16 slices beside ES's fp32 master: the drift callbacks log the realised bf16 change, as they do unsharded,
    not the master's (a step below bf16's resolution moves the master and leaves many weights where they were)."""
    from trl_ext.callbacks import sharded_parameter_drift

    torch.manual_seed(0)
    layouts = layouts_for(SHAPES, world, rank)
    shards = {name: torch.nn.Parameter(torch.randn(layout.size).to(torch.bfloat16)) for name, layout in layouts.items()}
    perturbation = ShardedPerturbation(shards, layouts, sigma=0.1)
    es = EvolutionStrategy(perturbation, population_size=6, learning_rate=2e-3, seed=3)
    es.keep_start()
    start = {name: perturbation.real(name, shard.detach().float().clone()) for name, shard in shards.items()}
    es.step(0, torch.randn(6))
    realised = {name: perturbation.real(name, shards[name].detach().float()) - start[name] for name in SHAPES}
    intended = {name: perturbation.real(name, es.master.value(name)) - start[name] for name in SHAPES}
    norm = float(sum(d.pow(2).sum() for d in realised.values()) ** 0.5)
    assert abs(norm - float(sum(d.pow(2).sum() for d in intended.values()) ** 0.5)) > 1e-3 * norm  # rounding shows
    drift = sharded_parameter_drift(es)  # one process: the sums over this slice
    assert drift["drift/update_norm"] == pytest.approx(norm, rel=1e-6)
    assert drift["drift/relative_norm"] == pytest.approx(
        norm / float(sum(s.pow(2).sum() for s in start.values()) ** 0.5), rel=1e-6)
    moved = sum(int((d.abs() > 1e-6).sum()) for d in realised.values())
    assert drift["drift/moved_fraction"] == pytest.approx(moved / 20)  # of the whole tensors' 15 + 5 weights
