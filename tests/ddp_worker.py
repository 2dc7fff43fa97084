"""Run by tests/test_distributed.py under torchrun (two gloo processes): one training step of the
smoke classifier with DDP inside the batch (each rank half of it, BatchNorm synchronised by
``distributed.sync_batchnorm``, the loss scaled as ``ClassifierTrainer`` scales it) against the
same step in one process on the whole batch with torch's own BatchNorm; rank 0 writes the largest
differences to the JSON file named by the first argument."""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from cam2mask_lib import distributed
from cam2mask_lib.classify import build_classifier

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = build_classifier("mobilenetv3_small_050", 4, dropout=0.0).double()
reference = copy.deepcopy(model)  # torch's BatchNorm, the whole batch
g = torch.Generator().manual_seed(1)
x = torch.randn(7, 3, 64, 96, generator=g, dtype=torch.float64)  # 7: ranks get 4 and 3 images
y = (torch.rand(7, 4, generator=g) > 0.5).double()
loss_fn = nn.BCEWithLogitsLoss()

ref_out = reference(x)
loss_fn(ref_out, y).backward()

ddp = nn.parallel.DistributedDataParallel(distributed.sync_batchnorm(model))
mine = slice(rank, None, world)
out = ddp(x[mine])
(loss_fn(out, y[mine]) * (len(x[mine]) * world / len(x))).backward()

diff = {
    "logits": (out - ref_out[mine]).abs().max().item(),
    # relative to the largest gradient (some BatchNorm biases have a gradient of exactly 0 up
    # to rounding: a bias shift that the next BatchNorm removes)
    "grads": max((p.grad - q.grad).abs().max().item()
                 for p, q in zip(model.parameters(), reference.parameters()))
    / max(q.grad.abs().max().item() for q in reference.parameters()),
    "running stats": max((a - b).abs().max().item() for (k, a), (_, b) in
                         zip(model.state_dict().items(), reference.state_dict().items())
                         if "running" in k),
    "names": list(model.state_dict()) == list(reference.state_dict()),
    "synced modules": sum(type(m).__name__.startswith("RankSynced") for m in model.modules()),
}
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(diff, f)
dist.destroy_process_group()
