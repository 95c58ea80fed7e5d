"""Decoding gpt2 (random weights, batch 1, a 16-token prompt, 32 new tokens, 1 thread, process CPU time,
medians of 3 after a warm-up that compiles) on the plain model with the dynamic cache, the static cache
and the compiled step, against the inference-only prepared model that ``generate.py`` decodes with: what
inductor gives on the CPU where it can compile (docs/performance.md). Prints whether the tokens agree.

    python benchmarks/plain_compiled.py
"""

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from config import get_config  # noqa: E402
from decoding.compiled import compile_decoding  # noqa: E402
from decoding.inference import prepare_for_inference  # noqa: E402
from decoding.static_cache import StaticDecoder  # noqa: E402
from models.generation import generate  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402

NEW_TOKENS = 32


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2Model(get_config("gpt2")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    sides = {"plain dynamic": model, "plain static": StaticDecoder(copy.deepcopy(model)),
             "plain compiled": compile_decoding(copy.deepcopy(model)),
             "prepared dynamic": prepare_for_inference(copy.deepcopy(model), inference_only=True)}
    outs = {k: generate(f, ids, max_new_tokens=NEW_TOKENS) for k, f in sides.items()}  # warm-up (compiles)
    print("identical:", {k: torch.equal(o, outs["plain dynamic"]) for k, o in outs.items()})
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(3):
        for k, f in sides.items():
            t = time.process_time()
            generate(f, ids, max_new_tokens=NEW_TOKENS)
            times[k].append(time.process_time() - t)
    for k, v in times.items():
        print(f"{k:>17}: {sorted(v)[1] / NEW_TOKENS * 1e3:.2f} ms/token")


if __name__ == "__main__":
    main()
