"""CPU time of one optimizer step over a saved model's parameters (1 thread, random gradients), the
mean of steps 2-21 (SOAP and Shampoo refresh their preconditioners twice in them).

    python benchmarks/optimizer_step.py runs/pretrain/tinyshakespeare/<run>/model.pt adamw soap shampoo
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.optimizers import build_optimizer  # noqa: E402
from methods.restore import load_model  # noqa: E402

torch.set_num_threads(1)
model = load_model(sys.argv[1])
params = list(model.parameters())
groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
print(f"{sum(p.numel() for p in params):,} parameters; shapes >= 2-D: "
      f"{sorted({tuple(p.shape) for p in groups[0]['params']})}")
for name in sys.argv[2:]:
    opt = build_optimizer(name, groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-6)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(21):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        t = time.process_time()
        opt.step()
        times.append(time.process_time() - t)
    print(f"{name}: {1000 * sum(times[1:]) / 20:.1f} ms CPU per step (mean of steps 2-21; first step "
          f"{1000 * times[0]:.1f} ms)")
