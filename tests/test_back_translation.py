"""Back-translation augmentation of the paraphrase training pairs (``tasks.back_translation``),
offline: a tiny random Marian pair (a sentencepiece model trained here on a few dozen lines, one
layer of width 16) stands in for ``Helsinki-NLP/opus-mt-en-de`` and ``-de-en``, as local folders
and as a Hugging Face hub cache. Its translations are noise, which is all these tests need: the
copies, their labels, the cache, the resume and the errors do not depend on translation quality."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import MarianConfig, MarianMTModel, MarianTokenizer

import paraphrase_detection as para
from cli.common import run_main
from errors import InputError
from tasks import back_translation as bt
from tasks import paraphrase as para_task
from tasks.back_translation import BackTranslation, augment_pairs, back_translate, marian_names, read_cache, write_cache
from tasks.quora_data import ParaphrasePair, read_quora
from tests.test_objectives_cli import paraphrase_args

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40
LINES = ([f"How do I cook dish {i}?" for i in range(12)] + [f"What is the recipe of dish {i}?" for i in range(12)]
         + [f"Why is the {w} {a}?" for w in ("sky", "sea", "sun") for a in ("blue", "big", "hot")])


def write_marian(folder: Path, spm_model: bytes, seed: int) -> Path:
    """A Marian model folder as ``save_pretrained`` leaves it: random weights, the given sentencepiece model."""
    folder.mkdir(parents=True)
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(spm_model)
    sp = spm.SentencePieceProcessor(model_proto=spm_model)
    vocab = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=2, eos_token_id=0, decoder_start_token_id=2, forced_eos_token_id=0)
    MarianMTModel(cfg).save_pretrained(folder)
    MarianTokenizer(*(str(folder / f) for f in ("source.spm", "target.spm", "vocab.json"))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def marian(tmp_path_factory) -> dict[str, Path]:
    """``en-de`` and ``de-en`` folders, and ``home``: an HF_HOME whose hub cache holds them as the Helsinki-NLP ids."""
    root = tmp_path_factory.mktemp("marian")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES), model_writer=model, vocab_size=48,
                                   hard_vocab_limit=False, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, minloglevel=2)
    out = {d: write_marian(root / d, model.getvalue(), seed) for seed, d in enumerate(("en-de", "de-en"))}
    for d, folder in list(out.items()):
        repo = root / "home" / "hub" / f"models--Helsinki-NLP--opus-mt-{d}"
        shutil.copytree(folder, repo / "snapshots" / COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    out["home"] = root / "home"
    return out


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The batch size of each translation ``generate`` call, in order."""
    seen: list[int] = []
    real = bt.translate_batch

    def spy(model, tokenizer, texts, num_beams):
        seen.append(len(texts))
        return real(model, tokenizer, texts, num_beams)

    monkeypatch.setattr(bt, "translate_batch", spy)
    return seen


def pairs(n: int) -> list[ParaphrasePair]:
    return [ParaphrasePair(f"q{i}", LINES[i], LINES[12 + i % 5], i % 2) for i in range(n)]


def test_copies_keep_their_labels_and_each_sentence_is_translated_once(marian, tmp_path, calls, capsys):
    config = BackTranslation("de", (str(marian["en-de"]), str(marian["de-en"])), tmp_path / "bt.jsonl", fraction=0.5,
                             side="both")
    first = augment_pairs(pairs(10), config, seed=3, device=torch.device("cpu"), progress=False)
    assert first[:10] == pairs(10) and len(first) == 15  # round(0.5 * 10) copies after the originals
    originals = {p.id: p for p in pairs(10)}
    for copy in first[10:]:
        source = originals[copy.id.removesuffix("-bt-de")]
        assert copy.label == source.label and copy.id == f"{source.id}-bt-de"
    sources = [originals[p.id.removesuffix("-bt-de")] for p in first[10:]]
    texts = {t for p in sources for t in (p.sentence1, p.sentence2)}
    assert calls == [len(texts), len(texts)]  # one batch there, one back: every distinct sentence once
    cache = read_cache(tmp_path / "bt.jsonl")
    assert {k[3] for k in cache} == texts and all(k[:3] == (*config.models, 1) for k in cache)
    assert f"{len(texts)} sentences translated now, 0 from" in capsys.readouterr().out

    calls.clear()
    again = augment_pairs(pairs(10), config, seed=3, device=torch.device("cpu"), progress=False)
    assert again == first and calls == []  # all from the cache: no model loaded, nothing translated
    assert f"0 sentences translated now, {len(texts)} from" in capsys.readouterr().out
    wider = BackTranslation("de", config.models, config.cache, fraction=1.0, side="both")
    augment_pairs(pairs(10), wider, seed=3, device=torch.device("cpu"), progress=False)
    assert sum(calls) == 2 * (len({p.sentence1 for p in pairs(10)} | {p.sentence2 for p in pairs(10)}) - len(texts))


def test_a_cli_run_from_the_hub_cache_and_its_resume_train_on_the_same_pairs(marian, tmp_path, calls, monkeypatch,
                                                                            use_hub_cache, capsys):
    use_hub_cache(marian["home"])  # offline: the Helsinki-NLP ids come from the cache
    seen: list[list[tuple[list[int], int]]] = []
    real = para_task.fit_task

    def spy(model, loss, features, *args, **kwargs):
        seen.append([(f["input_ids"], f["labels"]) for f in features])
        return real(model, loss, features, *args, **kwargs)

    monkeypatch.setattr(para_task, "fit_task", spy)
    args = paraphrase_args(tmp_path, "bt", "--back_translate", "de", "--back_translate_side", "sentence2")
    para.main(args)
    assert len(seen[0]) == 24 and [y for _, y in seen[0][12:]] == [y for _, y in seen[0][:12]]
    assert calls and (tmp_path / "back-translation.jsonl").exists()  # beside --para_train by default
    n_calls = len(calls)
    para.main([*args[:args.index("--epochs") + 1], "2", *args[args.index("--epochs") + 2:], "--resume"])
    assert "resumed from" in capsys.readouterr().out
    assert len(calls) == n_calls and seen[1] == seen[0]  # the resumed run read the cache: the same pairs


@pytest.mark.parametrize("extra, problem", [
    (["--back_translate", "de"], "Helsinki-NLP/opus-mt-en-de is no local folder and is not in the Hugging Face cache"),
    (["--back_translate", "de", "--back_translate_models", "missing/,x/y"], "folder missing/ does not exist"),
    (["--back_translate", "de", "--epochs", "0"], "changes nothing with --epochs 0"),
    (["--back_translate_models", "a/b,c/d"], "needs --back_translate PIVOT"),
    (["--back_translate_fraction", "0.5", "--back_translate_beams", "2"],
     "--back_translate_fraction, --back_translate_beams change nothing without --back_translate PIVOT"),
    (["--back_translate_side", "both"], "--back_translate_side changes nothing without --back_translate PIVOT"),
    (["--back_translate_cache", "x.jsonl"], "--back_translate_cache changes nothing without --back_translate PIVOT"),
])
def test_unusable_flags_are_one_error_line_before_any_run(tmp_path, use_hub_cache, capsys, extra, problem):
    use_hub_cache(tmp_path / "empty_home")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: para.main(paraphrase_args(tmp_path, "bad", *extra)))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and problem in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_folder_missing_a_file_and_a_missing_sentencepiece_are_refused(marian, tmp_path, monkeypatch):
    broken = shutil.copytree(marian["en-de"], tmp_path / "broken")
    (broken / "target.spm").unlink()
    with pytest.raises(InputError, match="not a complete Marian model folder: it lacks target.spm"):
        bt.check_back_translation("de", (str(broken), str(marian["de-en"])))
    monkeypatch.setattr(bt.transformers.utils, "is_sentencepiece_available", lambda: False)
    with pytest.raises(InputError, match="needs sentencepiece"):
        bt.check_back_translation("de", (str(marian["en-de"]), str(marian["de-en"])))


def test_the_flag_takes_two_models_while_parsing(capsys):
    with pytest.raises(SystemExit) as e:
        para.parse_args(["--back_translate", "de", "--back_translate_models", "only-one"])
    assert e.value.code == 2 and "two models" in capsys.readouterr().err


def test_plain_runs_load_neither_the_module_nor_marian(tmp_path):
    """The plain classifier never imports the module; a plain paraphrase run imports it (its flags
    are checked there) but loads neither Marian's classes nor sentencepiece."""
    code = ("import sys, classifier; assert 'tasks.back_translation' not in sys.modules; "
            "import paraphrase_detection; paraphrase_detection.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if 'marian' in m or m.startswith('sentencepiece')))")
    proc = subprocess.run([sys.executable, "-c", code, *paraphrase_args(tmp_path, "plain")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_side_sentence2_translates_only_the_second_questions(marian, tmp_path, calls):
    config = BackTranslation("de", (str(marian["en-de"]), str(marian["de-en"])), tmp_path / "bt.jsonl",
                             side="sentence2")
    out = augment_pairs(pairs(10), config, seed=0, device=torch.device("cpu"), progress=False)
    assert len(out) == 20  # fraction 1: every pair copied, in order
    for copy, source in zip(out[10:], pairs(10)):
        assert copy.sentence1 == source.sentence1 and copy.label == source.label
    assert {k[3] for k in read_cache(tmp_path / "bt.jsonl")} == {p.sentence2 for p in pairs(10)}
    assert calls == [5, 5]  # the five distinct second questions, there and back


def test_pad_is_never_generated_by_a_model_without_a_generation_config(marian, tmp_path, monkeypatch):
    """A hub Marian's ``bad_words_ids=[[pad]]`` lives in its config.json, which transformers 5 no
    longer reads generation settings from: ``translate_batch`` bans ``<pad>`` itself."""
    folder = shutil.copytree(marian["en-de"], tmp_path / "en-de")
    (folder / "generation_config.json").unlink(missing_ok=True)
    model, tokenizer = bt.load_marian(folder, torch.device("cpu"))
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        model.final_logits_bias[..., pad] = 100.0  # <pad> is every step's argmax
    made: list[torch.Tensor] = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: made.append(real(**kw)) or made[-1])
    bt.translate_batch(model, tokenizer, [LINES[0]], num_beams=1)
    assert made[0][0, 0] == pad and pad not in made[0][0, 1:].tolist()  # <pad> only as the decoder's start


def test_a_full_cache_needs_no_model(tmp_path, use_hub_cache, calls, capsys):
    """Offline, no Marian model anywhere: a run whose sentences are all cached still runs."""
    use_hub_cache(tmp_path / "empty_home")
    args = paraphrase_args(tmp_path, "cached", "--back_translate", "de")
    texts = {p.sentence1 for p in read_quora(args[args.index("--para_train") + 1])}
    write_cache(tmp_path / "back-translation.jsonl", {(*marian_names("de"), 1, t): f"{t} (back)" for t in texts})
    para.main(args)
    assert calls == [] and f"0 sentences translated now, {len(texts)} from" in capsys.readouterr().out


def test_an_unwritable_cache_folder_is_refused_before_any_run(tmp_path, use_hub_cache, capsys):
    use_hub_cache(tmp_path / "empty_home")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: para.main(paraphrase_args(tmp_path, "bad", "--back_translate", "de", "--back_translate_cache",
                                                   str(tmp_path / "a-file" / "sub" / "bt.jsonl"))))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and f"{tmp_path / 'a-file'} is not a writable folder" in err[0]
    assert not (tmp_path / "bad").exists()


def test_torchrun_needs_a_full_cache(marian, tmp_path, monkeypatch, calls):
    """Rank 0 alone would translate while the others time out waiting for its pairs: refused
    while parsing when there is no cache, and before loading a model when the cache lacks a sentence."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="fill the translation cache with a single-process run first"):
        para.settings_from_args(para.parse_args(paraphrase_args(tmp_path, "ddp", "--back_translate", "de")))
    config = BackTranslation("de", (str(marian["en-de"]), str(marian["de-en"])), tmp_path / "bt.jsonl")
    write_cache(config.cache, {(*config.models, 1, "a"): "b"})
    monkeypatch.setattr(bt.ranks, "active", lambda: True)
    assert back_translate(["a"], config, torch.device("cpu"), progress=False) == ({"a": "b"}, 0)
    with pytest.raises(InputError, match=r"1 sentences are not in the translation cache .*single-process run first"):
        back_translate(["a", "c"], config, torch.device("cpu"), progress=False)
    assert calls == []
