"""Each process feeds its half of a batch into KLDrift; compute() must give the float64 value of the whole batch. The
metric syncs through the library's collectives: torchmetrics' own sync of its host states (what failed under NCCL)
is refused by the guard."""

import sys

import torch
import torch.distributed as dist

from leave import leave
from collective_guard import install as guard_collectives

guard_collectives()  # a collective the library calls on a host tensor fails here as under NCCL
from lightning_es.drift import KLDrift, exact_token_kl
from torchmetrics.utilities.distributed import gather_all_tensors

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
own_sync = KLDrift(dist_sync_fn=gather_all_tensors)  # torchmetrics' sync, as KLDrift synced before
own_sync.update(exact_token_kl(current[share], reference[share]), mask[share])
try:
    own_sync.compute()
    caught = "not caught"
except RuntimeError as error:
    caught = "caught" if "outside lightning_es.engine.collectives" in str(error) else f"other error: {error}"
if rank == 0:
    with open(sys.argv[1], "w") as out:
        out.write(f"{float(value)!r} {dist.get_world_size()} {caught}")
dist.barrier()
leave()
