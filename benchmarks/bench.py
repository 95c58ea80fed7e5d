"""Side-by-side speed of our GPT-2 and ``transformers``' GPT-2 on the same weights.

One command times, for a chosen size and batch shape, a training step (forward,
backward, optimizer) and greedy decoding of ``--new_tokens`` tokens, for our
model and for ``transformers.GPT2LMHeadModel`` holding the very same weights
(built by ``transformers``, copied into ours through ``models.loading``).
It prints tokens per second, peak memory, the ratio ours / transformers, on
CUDA the model FLOPs utilisation, and at batch 1 the memory-bandwidth bound of
a decoding step. Decoding is timed for each ``--quantize`` representation of our
model (float32, bf16, weight-only int8 / int4), all beside ``transformers``
float32 in one interleaved run; ours decodes inference-only (one copy of each weight).
Timings are medians of ``--reps`` repetitions after
``--warmup``, with the two models interleaved so that load from other
processes hits both alike.

Fairness: same weights, shapes and dtype; ``transformers`` uses its default
attention implementation (``sdpa``) and ``generate(use_cache=True,
do_sample=False)``, ours ``generate`` on ``prepare_for_inference(copy, quantize, inference_only=True)``;
both sides train with the same optimizer (our AdamW, multi-tensor: ``engine.fast_adamw.FastAdamW``) and
dropout on (the configs' 0.1).

    python benchmarks/bench.py --model_size gpt2 --batch_size 8 --seq_len 128
    python benchmarks/bench.py --model_size gpt2 --threads 1 --clock cpu   # steadier on a busy machine
    python benchmarks/bench.py --model_size gpt2 --skip_train --quantize none bf16 int8 int4
    python benchmarks/bench.py --model_size gpt2 --skip_train --quantize none --decode_cache dynamic static compiled
    python benchmarks/bench.py --model_size gpt2-medium --batch_size 16 --seq_len 1024 --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.measure import CLOCK, matvec_bandwidth, peak_tflops, rss_mib, time_interleaved  # noqa: E402
from config import SIZES, GPT2Config  # noqa: E402
from decoding.compiled import compile_decoding  # noqa: E402
from decoding.inference import held_bytes, prepare_for_inference  # noqa: E402
from decoding.quant import QUANTIZE_CHOICES, QuantizationUnavailable, check_quantize  # noqa: E402
from decoding.static_cache import StaticDecoder  # noqa: E402
from engine.device import maybe_compile  # noqa: E402
from engine.fast_adamw import FastAdamW  # noqa: E402
from methods.gradient_checkpointing import enable_gradient_checkpointing  # noqa: E402
from models.generation import generate  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from models.loading import convert_hf_state_dict  # noqa: E402
from modules.losses import lm_loss  # noqa: E402


def build_config(args: argparse.Namespace) -> GPT2Config:
    """A named size, optionally with its width, depth or head count overridden."""
    d, n_layer, n_head = SIZES[args.model_size]
    return GPT2Config(hidden_size=args.n_embd or d, num_hidden_layers=args.n_layer or n_layer,
                      num_attention_heads=args.n_head or n_head)


def build_hf(cfg: GPT2Config, device: torch.device, seed: int = 0):
    """``transformers``' GPT2LMHeadModel, random init, same architecture and dropout as ``cfg``."""
    import transformers
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                      n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads, n_inner=cfg.intermediate_size,
                      resid_pdrop=cfg.hidden_dropout_prob, embd_pdrop=cfg.hidden_dropout_prob,
                      attn_pdrop=cfg.attention_probs_dropout_prob, layer_norm_epsilon=cfg.layer_norm_eps)
    hf = GPT2LMHeadModel(hf_cfg).to(device)  # default attn_implementation: sdpa
    hf.generation_config.eos_token_id = None  # always generate exactly new_tokens
    hf.generation_config.pad_token_id = 0
    return hf


def build_pair(cfg: GPT2Config, device: torch.device, seed: int = 0):
    """``transformers``' GPT2LMHeadModel and our GPT2Model holding the same weights."""
    hf = build_hf(cfg, device, seed)
    ours = GPT2Model(cfg)
    ours.load_state_dict(convert_hf_state_dict(hf.state_dict(), cfg, ours.state_dict()))
    return ours.to(device), hf


def train_step(model, side: str, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """A closure running one training step (forward, backward, optimizer) of one side on a fixed batch."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    opt = FastAdamW(model.parameters(), lr=1e-4)
    model.train()
    if side == "ours":
        if args.grad_ckpt:
            enable_gradient_checkpointing(model)
        run = maybe_compile(model, enabled=args.compile)

        def loss_fn() -> torch.Tensor:
            h = run(ids)["last_hidden_state"]  # (B, T, d)
            return lm_loss(h[:, :-1], model.wte.weight, ids[:, 1:], chunk_size=args.chunk_size)
    else:

        def loss_fn() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

    def step() -> torch.Tensor:
        with amp:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def decode_fn(model, side: str, args: argparse.Namespace, batch_size: int) -> Callable[[], torch.Tensor]:
    """A closure decoding ``new_tokens`` greedily from a fixed random prompt. ``side`` is
    ``transformers`` or ``ours/<quantize>[+static|+compiled]`` (``--decode_cache``): ours decodes a
    copy of ``model`` prepared inference-only (``prepare_for_inference(..., quantize, inference_only=True)``:
    each weight held once, in its decoding layout), prepared once here as a caller decoding many batches
    would, through a static cache or the compiled step if the side says so."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    model.eval()
    if side.startswith("ours"):
        own = model if args.probe else copy.deepcopy(model)  # the probe's model is its own to consume
        quantize, _, cache = side.partition("/")[2].partition("+")
        fast = prepare_for_inference(own, quantize=quantize or "none", inference_only=True, decode_rows=batch_size)
        fast = {"static": StaticDecoder, "compiled": compile_decoding}.get(cache, lambda m: m)(fast)
        return lambda: generate(fast, ids, max_new_tokens=args.new_tokens)
    return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                  use_cache=True)


def memory_probe(args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS over a few calls of one side, less the RSS of the bare
    process (CPU memory): weights, gradients, optimizer state, activations / KV cache.
    Only that side's model is built, so nothing else competes for the peak. For decoding the
    peak is reset (``/proc/self/clear_refs``) after the first call, so it is the decoding
    peak, not that of building, converting or quantising the model (transient on both sides)."""
    import transformers  # noqa: F401  (both sides import the same libraries before the baseline)

    kind, side, batch = args.probe.split(":")
    base = rss_mib()
    cfg = build_config(args)
    model = GPT2Model(cfg) if side.startswith("ours") else build_hf(cfg, torch.device("cpu"))
    fn = train_step(model, side, args) if kind == "train" else decode_fn(model, side, args, int(batch))
    fn()
    if kind == "decode":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    for _ in range(2):
        fn()
    peak = rss_mib("VmHWM")
    print(json.dumps({"peak_mib": peak - base}))


def probe_memory(kind: str, batch: int, sides: tuple[str, ...] = ("ours", "transformers")) -> dict[str, float]:
    """Peak memory of each side, each in its own process (CPU has no per-allocation peak counter)."""
    out = {}
    for side in sides:
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--probe", f"{kind}:{side}:{batch}"],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"memory probe {kind}:{side} failed:\n{res.stderr[-2000:]}")
        out[side] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def peak_memory(fns: dict[str, Callable[[], object]], kind: str, batch: int, device: torch.device):
    if device.type != "cuda":
        return probe_memory(kind, batch, tuple(fns))
    mem = {}
    for k, fn in fns.items():
        torch.cuda.reset_peak_memory_stats()
        fn()
        mem[k] = torch.cuda.max_memory_allocated() / 2**20  # weights, grads, optimizer state, activations
    return mem


def bench_train(ours, hf, args, device) -> None:
    fns = {"ours": train_step(ours, "ours", args), "transformers": train_step(hf, "transformers", args)}
    med, raw = time_interleaved(fns, device, args.warmup, args.reps)
    tokens = args.batch_size * args.seq_len
    mem = peak_memory(fns, "train", args.batch_size, device)
    print(f"\n== training step: {args.model_size} B={args.batch_size} T={args.seq_len} {args.dtype} "
          f"compile={args.compile} ==")
    for k in fns:
        print(f"{k:>13}: {med[k] * 1e3:9.1f} ms/step  {tokens / med[k]:9.0f} tok/s  peak mem {mem[k]:8.0f} MiB"
              f"   (reps ms: {' '.join(f'{t * 1e3:.0f}' for t in raw[k])})")
    print(f"ratio ours/transformers: throughput {med['transformers'] / med['ours']:.2f}x, "
          f"peak memory {mem['ours'] / mem['transformers']:.2f}x")
    if device.type == "cuda":
        n = sum(p.numel() for n_, p in ours.named_parameters() if n_ != "wpe.weight")
        peak = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
        for k in fns:
            achieved = 6 * n * tokens / med[k] / 1e12
            mfu = f"{100 * achieved / peak:.1f}%" if peak else "unknown peak (pass --peak_tflops)"
            print(f"{k:>13}: {achieved:.1f} TFLOPS (6N), MFU {mfu} on {torch.cuda.get_device_name()}")


def bench_decode(ours, hf, args, device) -> None:
    """``transformers`` float32 and ours in each ``--quantize`` representation, interleaved in one
    run per batch size: speed, peak memory, and each representation's greedy agreement with
    ``transformers`` (identical weights: float32 should agree exactly; the others' agreement on
    these random weights, whose logits are near ties, says nothing of quality: see
    ``benchmarks/quant_quality.py``)."""
    if not torch.equal(ours.wte.weight, hf.transformer.wte.weight.to(ours.wte.weight.device)):
        raise RuntimeError("greedy agreement compares the two sides on identical weights, and these differ")
    P = args.prompt_len
    quants = list(dict.fromkeys(args.quantize + (["bf16"] if args.bf16_decode else [])))
    for q in list(quants):
        try:
            check_quantize(q, device, ours.config.hidden_size)
        except QuantizationUnavailable as e:
            print(f"--quantize {q}: unavailable here ({e})")
            quants.remove(q)
    for B in args.decode_batches:
        sides = {(q, c): f"ours/{q}{'' if c == 'dynamic' else '+' + c}" for q in quants for c in args.decode_cache}
        fns = {side: decode_fn(ours, side, args, B) for side in sides.values()}
        fns["transformers"] = decode_fn(hf, "transformers", args, B)
        outs = {k: fn() for k, fn in fns.items()}
        med, raw = time_interleaved(fns, device, args.warmup, args.reps)
        mem = peak_memory(fns, "decode", B, device)
        tokens = B * args.new_tokens
        print(f"\n== greedy decoding: {args.model_size} B={B} prompt={P} new={args.new_tokens}; "
              f"transformers float32 ==")
        for k in fns:
            agree = (outs[k][:, P:] == outs["transformers"][:, P:]).float().mean().item()
            print(f"{k:>13}: {med[k] / args.new_tokens * 1e3:6.2f} ms/token  {tokens / med[k]:8.1f} tok/s  "
                  f"{med['transformers'] / med[k]:5.2f}x transformers  peak mem {mem[k]:7.0f} MiB "
                  f"({mem[k] / mem['transformers']:.2f}x)  greedy agreement {agree:.3f}"
                  f"  (reps ms: {' '.join(f'{t * 1e3:.0f}' for t in raw[k])})")
        if B == 1:
            bounds = {q: bandwidth_bound(ours, q, device) for q in quants}  # the cache variants share them
            for (q, _), side in sides.items():
                print_bound(bounds[q], side, med[side] / args.new_tokens)


def bandwidth_bound(model: GPT2Model, quantize: str, device: torch.device) -> tuple[str, int, dict[str, float]]:
    """What the batch-1 bound of a ``quantize`` representation is made of, whatever its cache: its
    kind, the bytes an inference-only model holds (less the position table, of which a step reads
    one row) and the matrix-vector rates measured for that kind."""
    fast = prepare_for_inference(copy.deepcopy(model), quantize=quantize, inference_only=True)
    nbytes = held_bytes(fast) - held_bytes(fast.body.wpe)
    kind = "float32" if quantize == "none" else quantize
    return kind, nbytes, matvec_bandwidth(device, kind)


def print_bound(measured: tuple[str, int, dict[str, float]], side: str, step_s: float) -> None:
    """The batch-1 bound of one side (``ours/<quantize>[+cache]``) from its ``bandwidth_bound``:
    the weights' bytes over the fastest matrix-vector rate measured."""
    kind, nbytes, bws = measured
    plus, cache = side.partition("+")[1:]
    bw = max(bws.values())
    bound = nbytes / bw
    print(f"bandwidth bound ({kind}): {nbytes / 2**20:.0f} MiB of weights / "
          f"{bw / 1e9:.1f} GB/s matvec = {bound * 1e3:.2f} ms/token; ours{plus}{cache} {step_s * 1e3:.2f} ms/token "
          f"= {step_s / bound:.2f}x the bound (matvec GB/s: "
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bws.items()) + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_size", default="gpt2", choices=sorted(SIZES))
    p.add_argument("--n_embd", type=int, default=0, help="override the size's width")
    p.add_argument("--n_layer", type=int, default=0, help="override the size's depth")
    p.add_argument("--n_head", type=int, default=0, help="override the size's head count")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--decode_batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast for training (weights stay float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads on CPU")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: time.perf_counter; cpu: time.process_time (robust to other load with --threads 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (falls back with a warning)")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in our model")
    p.add_argument("--chunk_size", type=int, default=256, help="rows per chunk of the LM-head loss "
                   "(lm_loss's default)")
    p.add_argument("--quantize", nargs="+", default=["none", "int8", "int4"], choices=QUANTIZE_CHOICES,
                   help="our decoding representations, each beside transformers float32 (none: float32)")
    p.add_argument("--decode_cache", nargs="+", default=["dynamic"], choices=["dynamic", "static", "compiled"],
                   help="our decoding's KV cache: dynamic (today's), static (decoding.static_cache), "
                        "compiled (static + torch.compile'd step, decoding.compiled); each a row")
    p.add_argument("--bf16_decode", action="store_true", help="also time our decoding in bfloat16 (--quantize bf16)")
    p.add_argument("--peak_tflops", type=float, default=None, help="GPU peak bf16 TFLOPS for MFU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--skip_decode", action="store_true")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory probe subprocess
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    cfg = build_config(args)
    if args.probe:
        memory_probe(args)
        return
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {args.threads} threads")
          + f", clock {args.clock}"
          + f", config {args.model_size} d={cfg.hidden_size} L={cfg.num_hidden_layers} h={cfg.num_attention_heads}, "
          f"{cfg.num_parameters() / 1e6:.1f}M params; transformers attention: sdpa; optimizer: FastAdamW "
          f"(foreach) on both sides; load average {os.getloadavg()[0]:.2f}")
    ours, hf = build_pair(cfg, device)
    if not args.skip_train:
        bench_train(ours, hf, args, device)
        ours, hf = build_pair(cfg, device)  # training moved each side's weights its own way
    if not args.skip_decode:
        bench_decode(ours, hf, args, device)


if __name__ == "__main__":
    main()
