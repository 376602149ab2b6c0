"""Each process feeds its half of a batch into KLDrift; compute() must give the float64 value of the whole batch."""

import sys

import torch
import torch.distributed as dist

from leave import leave
from lightning_es.drift import KLDrift, exact_token_kl

dist.init_process_group("gloo")
rank = dist.get_rank()
generator = torch.Generator().manual_seed(0)
current, reference = torch.randn(4, 6, 13, generator=generator), torch.randn(4, 6, 13, generator=generator)
mask = (torch.rand(4, 6, generator=generator) > 0.3).double()
metric = KLDrift()
share = slice(0, 1) if rank == 0 else slice(1, 4)  # unequal shares: the mean must weight by tokens
metric.update(exact_token_kl(current[share], reference[share]), mask[share])
p, q = current.double().softmax(-1), reference.double().softmax(-1)
expected = ((p * (p.log() - q.log())).sum(-1) * mask).sum() / mask.sum()
value = metric.compute()
torch.testing.assert_close(value, expected)
if rank == 0:
    with open(sys.argv[1], "w") as out:
        out.write(f"{float(value)!r} {dist.get_world_size()}")
dist.barrier()
leave()
