"""Sonnet files, the sonnet LM loss, chrF, every decoding strategy, and the CLI end to end."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from sacrebleu.metrics import CHRF

import sonnet_generation
from cli.sonnet import DECODINGS, describe, settings_from_args
from config import get_config
from decoding.mbr import pool_candidates
from engine.data import DataFormatError, PadCollator
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from tasks.course_data import read_sonnets, write_sonnets
from tasks.lm import sonnet_features
from tasks.metrics import chrf
from tasks.sonnet import SonnetDecoding, complete_prompts
from tests.conftest import SHARED_DATA, sonnet_data_flags

FILES = {"sonnets.txt": 131, "sonnets_held_out_dev.txt": 12, "TRUE_sonnets_held_out_dev.txt": 12,
         "sonnets_held_out.txt": 12}


@pytest.mark.parametrize("name", sorted(FILES))
def test_read_sonnets_splits_like_the_starter(name):
    path = SHARED_DATA / name
    ours = read_sonnets(path)
    starter = [s.strip() for s in re.split(r"\n\s*\d+\s*\n", path.read_text(encoding="utf-8"))[1:]]
    assert [s.text for s in ours] == starter and len(ours) == FILES[name]
    assert all("\r" not in s.text for s in ours)  # sonnets.txt has CRLF line ends


def test_read_sonnets_numbers_and_errors(tmp_path):
    assert [s.number for s in read_sonnets(SHARED_DATA / "sonnets_held_out_dev.txt")][:2] == [132, 133]
    assert len(read_sonnets(SHARED_DATA / "sonnets.txt", limit=5)) == 5
    with pytest.raises(DataFormatError, match="does not exist"):
        read_sonnets(tmp_path / "missing.txt")
    f = tmp_path / "header_only.txt"
    f.write_text("Sonnets\nby nobody\n")
    with pytest.raises(DataFormatError, match="no sonnets found"):
        read_sonnets(f)
    f.write_text("Sonnets\n\n1\n\nA line\n\n2\n\n\n3\n\nAnother\n")
    with pytest.raises(DataFormatError, match=r"empty.txt:7: sonnet 2 is empty") as e:
        read_sonnets(f.rename(tmp_path / "empty.txt"))
    assert e.value.line == 7


def test_prediction_file_has_the_starter_format_and_reads_back(tmp_path):
    sonnets = ["Line one,\nline two;\nline three.\n", "Only a line"]
    path = tmp_path / "pred" / "generated_sonnets.txt"
    write_sonnets(path, list(enumerate(sonnets)))
    expected = "--Generated Sonnets-- \n\n\n0\nLine one,\nline two;\nline three.\n\n\n\n1\nOnly a line\n\n"
    assert path.read_text() == expected
    assert [s.text for s in read_sonnets(path)] == [s.strip() for s in sonnets]


def test_chrf_of_a_hand_made_pair():
    # "ab" vs "abc": unigrams P 2/2 R 2/3, bigrams P 1/1 R 1/2, no longer hypothesis n-grams;
    # mean P 1, mean R 7/12, F_beta=2 = 5 * 1 * 7/12 / (4 + 7/12) = 7/11.
    assert chrf(["ab"], ["abc"]) == pytest.approx(700 / 11, abs=1e-9)
    hyp, ref = "Shall I compare thee to a summer's day?", "Shall I compare thee to a winter's night?"
    assert chrf([hyp], [ref]) == pytest.approx(CHRF().sentence_score(hyp, [ref]).score, abs=1e-9)
    assert chrf([hyp, "ab"], [ref, "abc"]) == pytest.approx(CHRF().corpus_score([hyp, "ab"], [[ref, "abc"]]).score)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return SonnetGPT(GPT2Model(get_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))


def test_loss_ignores_padding(tiny):
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    loss = tiny.loss(ids, mask)
    logits = tiny(ids, mask)
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                reduction="none").view(2, 5)
    expected = (per_token[0].sum() + per_token[1, :2].sum()) / 7  # 5 + 2 real targets
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    other_pad = ids.clone()
    other_pad[1, 3:] = 7
    assert tiny.loss(other_pad, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_training_examples_end_with_eos(tokenizer):
    feats = sonnet_features(["Shall I compare thee", "x " * 50], tokenizer, max_length=10)
    assert feats[0]["input_ids"] == tokenizer.encode("Shall I compare thee") + [tokenizer.eos_token_id]
    assert len(feats[1]["input_ids"]) == 10


def decoding_of(argv: list[str]) -> SonnetDecoding:
    """The decoding settings ``sonnet_generation.py`` reads from ``argv``."""
    return settings_from_args(sonnet_generation.get_args(argv)).decoding


@pytest.mark.parametrize("decoding", DECODINGS)
def test_every_decoding_completes_prompts(tiny, tokenizer, decoding):
    settings = decoding_of(["--decoding", decoding, "--max_new_tokens", "6", "--num_beams", "2",
                            "--mbr_candidates", "3", "--num_lines", "4"])
    config = settings.generation(tokenizer)
    prompts = ["From fairest creatures we desire increase,\nThat thereby beauty's rose", "When I do count"]
    pool = settings.pool
    assert (pool is not None) == (decoding == "mbr")
    texts = complete_prompts(tiny, tokenizer, prompts, config, batch_size=2, mbr_pool=pool)
    again = complete_prompts(tiny, tokenizer, prompts, config, batch_size=1, mbr_pool=pool)
    for p, t in zip(prompts, texts):
        assert t.startswith(p) and len(t) > len(p) and t.count("\n") < 4
    if decoding in ("greedy", "beam", "contrastive"):  # deterministic: left padding in a batch changes nothing
        assert texts == again


def test_mbr_pool_of_strategies_picks_one_of_its_candidates(tiny, tokenizer):
    args = sonnet_generation.get_args(["--decoding", "mbr", "--mbr_pool", "beam:2,sample:2,contrastive",
                                       "--max_new_tokens", "6", "--num_lines", "4"])
    settings = settings_from_args(args).decoding
    pool = settings.pool
    assert str(pool) == "beam:2,sample:2,contrastive:1" and describe(args).startswith("mbr mbr_pool=beam:2,")
    assert settings.label == describe(args)
    config = settings.generation(tokenizer)
    assert isinstance(config, GenerationConfig) and config.eos_token_id == tokenizer.eos_token_id
    prompts = ["When I do count the clock", "Shall I compare thee"]
    texts = complete_prompts(tiny, tokenizer, prompts, config, batch_size=2, mbr_pool=pool, seed=5)
    batch = PadCollator(tokenizer.pad_token_id, padding_side="left")(
        [{"input_ids": tokenizer.encode(p)} for p in prompts])
    groups = pool_candidates(tiny.gpt, batch["input_ids"], batch["attention_mask"], pool, config,
                             torch.Generator().manual_seed(5))
    for text, group in zip(texts, groups):
        assert len(group) == 5 and text in [tokenizer.decode(c).strip() for c in group]


@pytest.mark.parametrize("argv, message", [
    (["--mbr_pool", "beam:2"], "add --decoding mbr"),
    (["--decoding", "mbr", "--mbr_pool", "beam:2,nucleus:3"], "unknown strategy 'nucleus'"),
    (["--decoding", "mbr", "--mbr_pool", "greedy:2"], "count must be 1"),
])
def test_bad_mbr_pool_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sonnet_generation.get_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_contrastive_variant_flags_reach_generate(tokenizer):
    args = sonnet_generation.get_args(["--decoding", "contrastive", "--contrastive_mean_sim",
                                       "--contrastive_dynamic_alpha"])
    settings = settings_from_args(args).decoding
    config = settings.generation(tokenizer)
    assert config.contrastive_mean_sim and config.contrastive_dynamic_alpha and config.penalty_alpha == 0.6
    assert config.strategy == "contrastive" and config.top_k == 4
    assert describe(args) == settings.label == ("contrastive penalty_alpha=0.6 top_k=4 contrastive_mean_sim=True "
                                                "contrastive_dynamic_alpha=True")


@pytest.mark.parametrize("argv, want", [
    (["--decoding", "greedy", "--no_repeat_ngram_size", "3", "--no_cache"],
     dict(max_new_tokens=192, no_repeat_ngram_size=3, use_cache=False)),
    (["--decoding", "sample", "--top_k", "5", "--repetition_penalty", "1.3"],
     dict(max_new_tokens=192, do_sample=True, temperature=1.2, top_p=0.9, top_k=5, repetition_penalty=1.3)),
    (["--decoding", "beam", "--num_beams", "3", "--length_penalty", "0.5", "--temperature", "0.7"],
     dict(max_new_tokens=192, num_beams=3, length_penalty=0.5)),
    (["--decoding", "mbr", "--penalty_alpha", "0.3", "--max_new_tokens", "24"],
     dict(max_new_tokens=24, do_sample=True, temperature=1.2, top_p=0.9, length_penalty=1.0, penalty_alpha=0.3)),
])
def test_decoding_selects_which_flags_make_the_generation_config(argv, want, tokenizer):
    """``--decoding`` picks the flags that reach ``generate``; the others keep GenerationConfig's defaults."""
    settings = decoding_of(argv)
    assert settings.config == GenerationConfig(**want)
    config = settings.generation(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id and config.stop.num_lines == 14


def test_the_settings_defaults_are_the_flags_defaults():
    assert decoding_of([]) == SonnetDecoding()
    settings = settings_from_args(sonnet_generation.get_args([]))
    assert settings.dpo is None and settings.pretraining.corpus is None and settings.attention.pattern == "dense"
    assert settings.flags == vars(sonnet_generation.get_args([]))  # what checkpoints keep as extra["args"]


def test_a_generation_config_the_flags_cannot_make_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        sonnet_generation.get_args(["--decoding", "contrastive", "--contrastive_dynamic_alpha", "--penalty_alpha", "1"])
    assert e.value.code == 2 and "--penalty_alpha must be < 1 with contrastive_dynamic_alpha" in capsys.readouterr().err


data_flags = sonnet_data_flags


@pytest.mark.parametrize("mode,decoding,epochs", [("full-model", "sample", 2), ("lora", "greedy", 1),
                                                  ("prefix", "contrastive", 1)])
def test_cli_trains_writes_both_files_and_generates_from_the_checkpoint(tmp_path, mode, decoding, epochs):
    common = ["--model_size", "tiny", "--random_init", "--limit", "3", "--max_new_tokens", "6", "--max_length", "48",
              "--batch_size", "3", "--fine-tune-mode", mode, "--decoding", decoding, *data_flags(tmp_path)]
    result = sonnet_generation.main([*common, "--epochs", str(epochs), "--lr", "1e-3"])
    run = tmp_path / "run"
    assert len(list(run.glob("best-epoch*.pt"))) == epochs and (run / "sonnet-model.pt").exists()
    assert 1 <= result["best"]["epoch"] <= epochs
    saved = torch.load(sorted(run.glob("best-epoch*.pt"))[0], weights_only=True)["extra"]["args"]
    assert saved == vars(sonnet_generation.get_args([*common, "--epochs", str(epochs), "--lr", "1e-3"]))  # flat flags
    refs = [s.text for s in read_sonnets(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt", 3)]
    assert result["dev_chrf"] == pytest.approx(chrf(result["dev"], refs))  # the score of the written sonnets
    prompts = {"test": read_sonnets(SHARED_DATA / "sonnets_held_out.txt", 3),
               "dev": read_sonnets(SHARED_DATA / "sonnets_held_out_dev.txt", 3)}
    for split, name in (("test", "generated_sonnets.txt"), ("dev", "generated_sonnets_dev.txt")):
        written = read_sonnets(tmp_path / "pred" / name)
        assert [s.text for s in written] == result[split]
        assert [s.number for s in written] == [0, 1, 2]
        assert all(w.text.startswith(p.text) for w, p in zip(written, prompts[split]))
    # decoding again from the saved model, without training, gives the same sonnets (same seed)
    again = sonnet_generation.main([*common, "--generate_only", "--checkpoint", str(run / "sonnet-model.pt")])
    assert again["test"] == result["test"] and again["dev_chrf"] == pytest.approx(result["dev_chrf"])
    if mode != "full-model":  # a Trainer checkpoint (adapters only) on the same seeded random body loads too
        best = sorted(run.glob("best-epoch*.pt"))[0]
        from_best = sonnet_generation.main([*common, "--generate_only", "--checkpoint", str(best)])
        assert from_best["test"] == result["test"]


def test_generate_only_needs_a_checkpoint():
    with pytest.raises(SystemExit):
        sonnet_generation.get_args(["--generate_only"])


def test_defaults_are_the_reported_settings():
    a = sonnet_generation.get_args([])
    assert (a.epochs, a.batch_size, a.patience, a.save_top_k) == (10, 8, 0, 3)  # the starter's 10 epochs
    r = sonnet_generation.get_args(["--recipe", "recommended"])
    assert (r.epochs, r.batch_size, r.patience, r.save_top_k) == (50, 8, 3, 3)  # up to 50 epochs, early stopping
    assert (a.pretrain_epochs, a.pretrain_batch_size) == (10, 4)
    assert (a.decoding, a.top_p, a.temperature, a.num_lines) == ("sample", 0.9, 1.2, 14)
    assert a.lr == 1e-5 and sonnet_generation.get_args(["--fine-tune-mode", "lora"]).lr == 3e-4


def test_lm_loss_skips_the_pad_position_under_left_padding():
    """Under left padding the first real token follows a pad: it is not predicted from the pad
    (the loss counts 3 + 5 targets for rows of 4 and 6 tokens, as with right padding)."""
    from config import GPT2Config
    from engine.data import PadCollator

    torch.manual_seed(0)
    model = SonnetGPT(GPT2Model(GPT2Config(vocab_size=50, max_position_embeddings=16, hidden_size=16,
                                           num_hidden_layers=1, num_attention_heads=2))).eval()
    rows = [[5, 9, 11, 3], [7, 8, 2, 4, 6, 1]]
    with torch.no_grad():
        left = PadCollator(0, padding_side="left")([{"input_ids": r} for r in rows])
        logits = model(left["input_ids"], left["attention_mask"])  # (B, T, V)
        want = torch.cat([F.cross_entropy(logits[i, -len(r):-1], torch.tensor(r[1:]), reduction="none")
                          for i, r in enumerate(rows)]).mean()
        torch.testing.assert_close(model.loss(left["input_ids"], left["attention_mask"]), want)
