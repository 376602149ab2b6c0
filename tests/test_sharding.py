import torch

from lightning_es import EvolutionStrategy
from lightning_es.noise import GaussianNoise
from lightning_es.sharding import ShardedNoise, ShardLayout, slices_of


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
    unsharded = EvolutionStrategy(full, population_size=6, sigma=0.1, lr=0.05, seed=3)
    unsharded.step(0, fitness)
    expected = {name: p.detach().clone() for name, p in full.items()}
    torch.manual_seed(0)
    start = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    pieces = {name: [] for name in SHAPES}
    for rank in range(2):
        layouts = layouts_for(SHAPES, 2, rank)
        shards = {name: torch.nn.Parameter(t) for name, t in slices_of(start, layouts).items()}
        es = EvolutionStrategy(shards, population_size=6, sigma=0.1, lr=0.05, seed=3, noise=ShardedNoise(layouts))
        es.step(0, fitness)
        for name, shard in shards.items():
            pieces[name].append(shard.detach())
    for name, shape in SHAPES.items():
        numel = torch.Size(shape).numel()
        torch.testing.assert_close(torch.cat(pieces[name])[:numel].view(shape), expected[name], rtol=0, atol=1e-6)
