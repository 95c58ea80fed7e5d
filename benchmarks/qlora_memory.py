"""Trainable parameters and peak training memory of LoRA / DoRA on an int8 or int4 base (QLoRA,
``--quantize_base``, ``methods.qlora``) against the same adapters on a float32 base, one process per variant.

    python benchmarks/qlora_memory.py --model_size gpt2 --batch_size 4 --seq_len 128

Each variant builds the model, wraps the targets, and resets the process's peak RSS
(``/proc/self/clear_refs``) so that building and quantising do not count; the peak is then
taken over ``--steps`` training steps (forward, backward, ``FastAdamW``, the Trainer's AdamW, on the
adapters), less the RSS of the bare process. Weights are random (memory does not depend on
them). The tied embedding stays float32 and frozen in every variant. The probes run with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``): with its default dynamic threshold,
freed transients (DoRA dequantises each base weight per forward for its norms) stay resident
and the peak measured the allocator (DoRA on int8 then read 1.10x the float base instead of 0.83x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

# name -> (DoRA, --quantize_base): the float32 base against the int8 and int4 bases of methods.qlora
VARIANTS = {f"{kind}/{base}": (kind == "dora", "none" if base == "float32" else base)
            for kind in ("lora", "dora") for base in ("float32", "int8", "int4")}


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def probe(args: argparse.Namespace) -> dict[str, float]:
    """In this process: one variant's trainable parameters and peak training memory."""
    from config import get_config
    from engine.fast_adamw import FastAdamW
    from methods.lora import apply_lora, mark_only_lora_trainable
    from models.gpt2 import GPT2Model
    from modules.losses import lm_loss

    use_dora, quantize = VARIANTS[args.probe]
    base = rss_mib("VmRSS")
    torch.manual_seed(0)
    model = GPT2Model(get_config(args.model_size))
    apply_lora(model, r=args.r, use_dora=use_dora, quantize_base=quantize)
    trainable = mark_only_lora_trainable(model)
    model.train()
    opt = FastAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS: the model as trained, not its construction
    for _ in range(args.steps):
        h = model(ids)["last_hidden_state"]
        lm_loss(h[:, :-1], model.wte.weight, ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters()),
            "peak_mib": rss_mib("VmHWM") - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_size", default="gpt2")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--probe", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args)))
        return
    print(f"{args.model_size}, B={args.batch_size} T={args.seq_len}, r={args.r}, {args.steps} steps")
    rows = {}
    for name in VARIANTS:
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--probe", name], capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        if res.returncode:
            raise SystemExit(f"{name} failed:\n{res.stderr[-2000:]}")
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1])
    for name, r in rows.items():
        ref = rows[name.split("/")[0] + "/float32"]
        print(f"{name:>13}: {r['trainable']:>9,} trainable of {r['total']:>11,} parameters; peak training "
              f"memory {r['peak_mib']:6.0f} MiB ({r['peak_mib'] / ref['peak_mib']:.2f}x the float32 base)")


if __name__ == "__main__":
    main()
