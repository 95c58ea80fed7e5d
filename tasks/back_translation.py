"""Back-translation augmentation of the Quora training pairs (report 002's data method):

    python paraphrase_detection.py --back_translate de --back_translate_fraction 0.5

A chosen fraction of the training pairs (a seeded sample) gets a copy, with the same label, whose
question (``--back_translate_side``: sentence1, sentence2 or both) went English -> pivot ->
English through two Marian models (``Helsinki-NLP/opus-mt-en-{pivot}`` and ``-{pivot}-en`` from the
hub or its cache, or two local folders with ``--back_translate_models``). A translated question
says the same thing in other words, so the label stays right while the pair's wording moves away
from the exact overlap a model can learn instead of the meaning.

Translation is the slow part, so each (models, beams, sentence) is translated once: the results
go to a JSONL cache (``--back_translate_cache``, default ``back-translation.jsonl`` beside the
training file), rewritten atomically as chunks finish, read back by every later run (and by a
resumed one, which so sees the same augmented data). A run whose sentences are all cached
loads no translation model, nor needs one (the models are checked only when a sentence is
missing); under torchrun the cache must hold them all. The Marian classes are reached through
``transformers``' own lazy module at call time, so a run without the flag never loads them (nor
sentencepiece). ``<pad>`` is banned from the output (``translate_batch``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm

from engine import ranks
from engine.checkpoints import atomic_write
from engine.data import DataFormatError, sample
from errors import InputError
from models.loading import WEIGHT_FILES, cached_hub_file, hub_cache_dir, hub_file, hub_reachable
from tasks.quora_data import ParaphrasePair

HUB_NAME = "Helsinki-NLP/opus-mt-{src}-{tgt}"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name; a name that is neither is taken for a missing folder
MARIAN_FILES = ("config.json", "source.spm", "target.spm", "vocab.json")  # what MarianMTModel/Tokenizer read
SIDES = ("sentence1", "sentence2", "both")
BATCH_SIZE = 32  # sentences per generate call
SAVE_EVERY = 4096  # sentences translated (there and back) between two rewrites of the cache
MODELS_HINT = "or pass two local Marian folders with --back_translate_models DIR_EN_X,DIR_X_EN"
Key = tuple[str, str, int, str]  # (English -> pivot model, pivot -> English model, beams, sentence)


@dataclass(frozen=True)
class BackTranslation:
    """What to augment with: the pivot language, the two models (hub ids or folders), the fraction
    of training pairs copied, which question is translated, the beam count and the cache file."""

    pivot: str
    models: tuple[str, str]
    cache: Path
    fraction: float = 1.0
    side: str = "sentence1"
    num_beams: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> BackTranslation:
        """From a paraphrase run's settings (``tasks.paraphrase.ParaphraseSettings``'s
        ``back_translate*`` fields; an empty cache path means beside ``para_train``)."""
        cache = settings.back_translate_cache or Path(settings.para_train).parent / "back-translation.jsonl"
        return cls(settings.back_translate, marian_names(settings.back_translate, settings.back_translate_models),
                   Path(cache), settings.back_translate_fraction, settings.back_translate_side,
                   settings.back_translate_beams)


def marian_names(pivot: str, models: Sequence[str] = ()) -> tuple[str, str]:
    """The (English -> pivot, pivot -> English) models: ``models`` when given, else the Helsinki-NLP hub ids."""
    if models:
        return models[0], models[1]
    return HUB_NAME.format(src="en", tgt=pivot), HUB_NAME.format(src=pivot, tgt="en")


def resolve_marian(name: str) -> Path:
    """The folder holding Marian model ``name``'s files: ``name`` itself when it is a folder, else
    its hub snapshot (the cache first, then a download where the hub is reachable). A missing
    piece is an ``InputError`` of one line naming it."""
    path = Path(name).expanduser()
    if (path.exists() and not path.is_dir()) or (not path.exists() and not HUB_ID.fullmatch(name)):
        raise InputError(f"Marian model folder {name} {'is not a folder' if path.exists() else 'does not exist'}")
    if path.is_dir():
        missing = [f for f in MARIAN_FILES if not (path / f).is_file()]
        if not any((path / w).is_file() for w in WEIGHT_FILES):
            missing.append(" or ".join(WEIGHT_FILES))
        if missing:
            raise InputError(f"{path} is not a complete Marian model folder: it lacks {', '.join(missing)}")
        return path
    found = {f: hub_file(name, f) for f in MARIAN_FILES}  # the cache first, then the hub where reachable
    weights = (next((p for p in (cached_hub_file(name, w) for w in WEIGHT_FILES) if p), None)
               or next((p for p in (hub_file(name, w) for w in WEIGHT_FILES) if p), None))
    missing = [f for f, p in found.items() if p is None] + ([] if weights else [" or ".join(WEIGHT_FILES)])
    if missing:
        where = ("could not be downloaded from the hub" if hub_reachable() else
                 f"is not in the Hugging Face cache {hub_cache_dir()} and the hub is unreachable")
        raise InputError(f"Marian model {name} is no local folder and {where} (missing {', '.join(missing)}): "
                         f"run once where the hub is reachable, {MODELS_HINT}")
    folders = {p.parent for p in (*found.values(), weights)}  # type: ignore[union-attr]
    if len(folders) > 1:
        raise InputError(f"Marian model {name}: the cache holds its files in several snapshots "
                         f"({', '.join(map(str, sorted(folders)))}); download it again, {MODELS_HINT}")
    return folders.pop()


def check_back_translation(pivot: str, models: Sequence[str] = ()) -> tuple[Path, Path]:
    """Before anything is built: sentencepiece installed and both Marian models at hand (their
    folders), else one ``InputError`` line saying what to do."""
    if not transformers.utils.is_sentencepiece_available():
        raise InputError("--back_translate needs sentencepiece (Marian's tokenizer): "
                         "pip install -r requirements.txt (or pip install sentencepiece)")
    there, back = marian_names(pivot, models)
    return resolve_marian(there), resolve_marian(back)


# ----------------------------------------------------------------- the cache


def check_cache_writable(path: Path) -> None:
    """Before translating: the cache's folder (its nearest existing parent) must take the file, else
    one ``InputError`` line, rather than a traceback once the translations are done."""
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise InputError(f"--back_translate_cache {path}: {folder} is not a writable folder; "
                         "pass a writable --back_translate_cache")


def check_can_translate(config: BackTranslation, missing: str, distributed: bool) -> tuple[Path, Path]:
    """Everything translating needs, else one ``InputError`` line: a single process (under torchrun,
    rank 0 alone would translate while the other ranks wait for its pairs in a collective that times
    out long before a training set is translated; ``missing`` says what the cache lacks), a writable
    cache folder, sentencepiece and both Marian models (their folders, returned)."""
    if distributed:
        raise InputError(f"--back_translate under torchrun: {missing}; fill the translation cache with a "
                         "single-process run first (same flags, without torchrun)")
    check_cache_writable(config.cache)
    return check_back_translation(config.pivot, config.models)


def read_cache(path: Path) -> dict[Key, str]:
    """Every back-translation the cache file holds (none when it does not exist yet)."""
    out: dict[Key, str] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            out[(r["models"][0], r["models"][1], int(r["beams"]), r["text"])] = r["back"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise DataFormatError(path, n, f"not a back-translation record ({type(e).__name__}: {e}); delete the "
                                           "line or the file (it is a cache: it is rebuilt)") from None
    return out


def write_cache(path: Path, entries: dict[Key, str]) -> None:
    """All ``entries`` as JSONL, atomically (a crash leaves the previous file)."""
    lines = (json.dumps({"models": [a, b], "beams": beams, "text": text, "back": back}, ensure_ascii=False)
             for (a, b, beams, text), back in entries.items())
    atomic_write(path, lambda f: f.write("".join(f"{line}\n" for line in lines).encode("utf-8")))


# ----------------------------------------------------------------- translation


def load_marian(folder: Path, device: torch.device) -> tuple[Any, Any]:
    """(MarianMTModel in eval mode on ``device``, MarianTokenizer) from a resolved folder."""
    tokenizer = transformers.MarianTokenizer.from_pretrained(str(folder))  # warns without sacremoses (punctuation)
    return transformers.MarianMTModel.from_pretrained(str(folder)).to(device).eval(), tokenizer


def translate_batch(model: Any, tokenizer: Any, texts: Sequence[str], num_beams: int) -> list[str]:
    """One ``generate`` call: greedy (``num_beams`` 1) or beam search, at most about twice the
    source's length (a short question) and never past the model's positions. ``<pad>`` is never
    generated (Marian's ``bad_words_ids``, which a hub model's config.json holds but transformers 5
    no longer reads from it): ``skip_special_tokens`` would silently delete it from the text."""
    room = model.config.max_position_embeddings - 1  # the source is cut to it (a question is far shorter)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=room).to(model.device)
    with torch.no_grad():
        out = model.generate(**enc, num_beams=num_beams, do_sample=False, bad_words_ids=[[tokenizer.pad_token_id]],
                             max_new_tokens=min(room, 2 * enc["input_ids"].shape[1] + 8))
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def translate(model: Any, tokenizer: Any, texts: Sequence[str], num_beams: int,
              step: Callable[[int], Any]) -> list[str]:
    """``texts`` translated in batches of similar length (little padding), in input order;
    ``step(n)`` after each batch (the progress bar)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [""] * len(texts)
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start:start + BATCH_SIZE]
        for i, t in zip(idx, translate_batch(model, tokenizer, [texts[i] for i in idx], num_beams)):
            out[i] = t
        step(len(idx))
    return out


def back_translate(texts: Iterable[str], config: BackTranslation, device: torch.device,
                   progress: bool = True) -> tuple[dict[str, str], int]:
    """({sentence: its back-translation}, how many were translated now rather than read from the
    cache). The models load only when a sentence is missing from the cache; the cache is
    rewritten after each chunk of ``SAVE_EVERY`` sentences, so an interrupted run keeps its work.
    The global RNG is left as it was, so a run that translates and one that reads the cache train alike."""
    cache = read_cache(config.cache)
    key = (*config.models, config.num_beams)
    wanted = sorted({t for t in texts if t.strip()})
    todo = [t for t in wanted if (*key, t) not in cache]
    if todo:
        folders = check_can_translate(config, f"{len(todo)} sentences are not in the translation cache "
                                              f"{config.cache}", ranks.active())
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            there, back = (load_marian(f, device) for f in folders)
            bar = tqdm(total=2 * len(todo), desc=f"back-translating via {config.pivot}", disable=not progress,
                       unit="sentence")
            for start in range(0, len(todo), SAVE_EVERY):
                chunk = todo[start:start + SAVE_EVERY]
                pivot = translate(*there, chunk, config.num_beams, bar.update)
                for t, b in zip(chunk, translate(*back, pivot, config.num_beams, bar.update)):
                    cache[(*key, t)] = b
                write_cache(config.cache, cache)
            bar.close()
    return {t: cache.get((*key, t)) or t for t in wanted}, len(todo)  # an empty translation keeps the original


def augment_pairs(pairs: Sequence[ParaphrasePair], config: BackTranslation, seed: int, device: torch.device,
                  progress: bool = True) -> list[ParaphrasePair]:
    """``pairs`` followed by a back-translated copy (same label, id ``<id>-bt-<pivot>``) of
    ``round(fraction * len(pairs))`` of them, drawn with ``seed``: the same copies on every run
    and on a resumed one. Under torchrun the cache must hold every sentence already (``back_translate``
    refuses to translate there): rank 0 reads it and the other ranks get its pairs."""
    def build() -> list[ParaphrasePair]:
        n = round(config.fraction * len(pairs))
        chosen = sample(pairs, n, seed) if n else []  # sample keeps all for n = 0
        sides = ("sentence1", "sentence2") if config.side == "both" else (config.side,)
        texts = [getattr(p, s) for p in chosen for s in sides]
        done, n_new = back_translate(texts, config, device, progress)
        copies = []
        for p in chosen:
            new = {s: done.get(getattr(p, s), getattr(p, s)) for s in sides}
            copies.append(ParaphrasePair(f"{p.id}-bt-{config.pivot}", new.get("sentence1", p.sentence1),
                                         new.get("sentence2", p.sentence2), p.label, p.line, p.path))
        same = sum((c.sentence1, c.sentence2) == (p.sentence1, p.sentence2) for c, p in zip(copies, chosen))
        print(f"back-translation via {config.pivot} ({config.side}): {len(copies)} of {len(pairs)} training pairs "
              f"copied ({n_new} sentences translated now, {len(done) - n_new} from {config.cache}; "
              f"{same} came back unchanged)")
        return [*pairs, *copies]

    return ranks.on_main(build)


__all__ = ["BackTranslation", "augment_pairs", "back_translate", "check_back_translation", "check_cache_writable",
           "check_can_translate", "marian_names", "read_cache", "resolve_marian", "translate_batch", "write_cache"]
