"""Impossible Distillation: each filter on hand-made pairs, ROUGE-L on known
values, the pair file, resumable generation, and a tiny end-to-end run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from distillation.filters import (
    FilterConfig,
    Pair,
    apply_filters,
    candidate_pairs,
    dedup,
    entailment_scores,
    length_ratio_ok,
    not_copy,
    rouge_f,
)
from distillation.numbers import extract_numbers, numbers_match
from distillation.records import append_jsonl, read_jsonl, summary_path, write_quora_tsv, write_summary

# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_known_values() -> None:
    # LCS("the cat sat on the mat", "the cat was on the mat") = 5 of 6 and 6 tokens: F = 5/6.
    assert rouge_f("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" (2); P = 2/3, R = 2/4 -> F = 2PR/(P+R) = 4/7.
    assert rouge_f("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_f("Same words here", "same WORDS here") == 1.0
    assert rouge_f("nothing shared", "at all") == 0.0


@pytest.mark.parametrize("s1,s2", [
    ("Is Python good?", "Is Python good."),
    ("The man walked his dog, again.", "the man walked his dog again"),
    ("Prices rose 5% in May!", "Prices rose 5 % in May."),
    ("She said: 'no'.", "she said no"),
    ("The cat sat on the mat.", "A dog slept under the old table?"),
])
def test_rouge_l_is_the_reference_implementation(s1, s2) -> None:
    """Scores equal rouge-score's (its tokenizer drops punctuation), so a copy that differs only in
    punctuation is a copy: a whitespace split scored "Is Python good?" vs "Is Python good." 0.667."""
    from rouge_score import rouge_scorer

    want = rouge_scorer.RougeScorer(["rougeL"]).score(s1, s2)["rougeL"].fmeasure
    assert rouge_f(s1, s2) == pytest.approx(want)
    assert rouge_f("Is Python good?", "Is Python good.") == 1.0
    assert not not_copy("Is Python good?", "Is Python good.")


# ---------------------------------------------------------------- length


def test_length_ratio() -> None:
    s = "x" * 100
    assert length_ratio_ok(s, "y" * 80) and length_ratio_ok(s, "y" * 150)
    assert not length_ratio_ok(s, "y" * 79) and not length_ratio_ok(s, "y" * 151)
    assert not length_ratio_ok("", "y")


def test_length_filter_applies_the_documented_window() -> None:
    """[0.8, 1.5] on len(s2) / len(s1) in the pair's order: a 0.7 ratio is removed (trying both
    orders used to pass it as 1.43, so min_ratio had no effect), and a pair is never flipped."""
    pairs = [Pair("c", "x" * 100, "y" * 70), Pair("c", "x" * 100, "y" * 85), Pair("c", "x" * 100, "y" * 140)]
    res = apply_filters(pairs, lambda q: [1.0] * len(q), FilterConfig(max_rouge=1.0))
    assert res.counts["removed_by_length"] == 1
    assert [(len(p.s1), len(p.s2)) for p in res.scored] == [(100, 85), (100, 140)]
    res = apply_filters([Pair("c", "x" * 100, "y" * 70)], lambda q: [1.0] * len(q),
                        FilterConfig(min_ratio=0.6, max_rouge=1.0))
    assert res.counts["removed_by_length"] == 0


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "a, b",
    [
        ("The city paid 1,000 dollars.", "The city spent 1000 dollars."),
        ("Two men were arrested.", "Police arrested 2 men."),
        ("About 3 million people voted.", "Roughly three million people cast ballots."),
        ("It grew by 3.50 percent in 2019.", "In 2019 it rose 3.5%."),
        ("Twenty-five cars crashed.", "25 cars were in the crash."),
        ("No one came to the party.", "Nobody attended the party."),  # a lone "one" is not a count
        ("The sky is blue.", "Blue is the colour of the sky."),
    ],
)
def test_numbers_match(a: str, b: str) -> None:
    assert numbers_match(a, b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("Three people died.", "Five people died."),
        ("It cost 1,000 dollars.", "It cost 10,000 dollars."),
        ("He scored 12 points in 2020.", "He scored 12 points."),
        ("The 2nd game was close.", "The second game was close."),  # word ordinals are not numbers
        ("5 6 7", "5 6"),
    ],
)
def test_numbers_mismatch(a: str, b: str) -> None:
    assert not numbers_match(a, b)


def test_extract_numbers_compounds() -> None:
    assert extract_numbers("one hundred and five") == {105}
    assert extract_numbers("two thousand three hundred") == {2300}
    assert extract_numbers("a million fans, 4 of 10 and 2023") == {1_000_000, 4, 10, 2023}


# ---------------------------------------------------------------- copy


def test_copy_filter() -> None:
    assert not not_copy("The man walked his dog in the park.", "The man walked his dog in the park today.")
    assert not_copy("The man walked his dog in the park.", "A dog was taken for a stroll by its owner.")


# ---------------------------------------------------------------- entailment and dedup


def _scorer(table: dict[tuple[str, str], float]):
    calls = []

    def score(pairs):
        calls.append(len(pairs))
        return [table.get((a, b), 0.0) for a, b in pairs]

    score.calls = calls
    return score


def test_entailment_needs_both_directions() -> None:
    pairs = [Pair("c", "a", "b"), Pair("c", "a", "d")]
    fn = _scorer({("a", "b"): 0.9, ("b", "a"): 0.8, ("a", "d"): 0.99, ("d", "a"): 0.2})
    entailment_scores(pairs, fn)
    assert fn.calls == [4]  # one call, both directions
    assert (pairs[0].forward, pairs[0].backward) == (0.9, 0.8)
    res = apply_filters([Pair("c", "a", "b"), Pair("c", "a", "d")], fn, FilterConfig(min_ratio=0, max_ratio=99))
    assert [(p.s1, p.s2) for p in res.kept] == [("a", "b")]
    assert [(p.s1, p.s2) for p in res.negatives] == [("a", "d")]
    assert res.counts["removed_by_entailment"] == 1


def test_dedup_keeps_lowest_rouge_per_group() -> None:
    pairs = [Pair("c", "a", "b", rouge_l=0.5), Pair("c", "b", "c", rouge_l=0.3), Pair("c", "x", "y", rouge_l=0.6)]
    # a-b-c is one group (b links them); x-y another.
    assert [(p.s1, p.s2) for p in dedup(pairs)] == [("b", "c"), ("x", "y")]


def test_apply_filters_counts_each_filter() -> None:
    src = "The mayor opened the new bridge on Monday."
    para = "On Monday, the new bridge was opened by the mayor."
    para2 = "Monday saw the city's mayor open the new bridge."
    cands = candidate_pairs("c0", [src, para, para2, src,  # exact duplicate sentence: dropped
                                   "Short.",  # length
                                   "The mayor opened 3 new bridges on Monday.",  # numbers
                                   "The mayor opened the new bridge on Monday!",  # copy
                                   "The weather on Monday was cold and wet all day."])  # not entailed
    paraphrases = {src, para, para2}
    fn = _scorer({})

    def score(pairs):
        return [0.95 if a in paraphrases and b in paraphrases else 0.1 for a, b in pairs]

    res = apply_filters(cands, score, FilterConfig())
    c = res.counts
    assert c["candidates"] == 21  # 7 distinct sentences
    assert c["removed_by_length"] == 6  # "Short." with everything
    assert c["removed_by_numbers"] == 5  # "3 bridges" with the 5 remaining number-free sentences
    assert c["removed_by_copy"] == 1  # src vs src + "!"
    assert c["kept"] == 1 and c["removed_by_dedup"] == 2  # src, para, para2 entail each other: one group
    assert c["removed_by_entailment"] == 9 - 3  # 9 reach it, 3 are among the paraphrases
    assert sum(v for k, v in c.items() if k.startswith("removed_by")) + c["kept"] == c["candidates"]
    kept = res.kept[0]
    assert {kept.s1, kept.s2} <= paraphrases and kept.rouge_l == min(
        rouge_f(a, b) for a, b in [(src, para), (src, para2), (para, para2)])
    assert all(p.forward < 0.75 or p.backward < 0.75 for p in res.negatives)
    assert fn.calls == []


# ---------------------------------------------------------------- files


def test_quora_tsv_format_and_reader(tmp_path) -> None:
    path = tmp_path / "pairs.csv"
    n = write_quora_tsv(path, [("A said \"hi\".", "B\tsaid hi.")], [("x y", "z w")], seed=1)
    assert n == 2
    lines = path.read_text().split("\n")
    assert lines[0] == "\tid\tsentence1\tsentence2\tis_duplicate"
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    assert sorted(r["is_duplicate"] for r in rows) == ["0.0", "1.0"]
    pos = next(r for r in rows if r["is_duplicate"] == "1.0")
    assert pos["sentence1"] == 'A said "hi".' and pos["sentence2"] == "B said hi."
    assert all(len(r["id"]) == 25 for r in rows)


def test_jsonl_append_resume_and_truncated_tail(tmp_path) -> None:
    path = tmp_path / "gen.jsonl"
    append_jsonl(path, [{"id": "a"}, {"id": "b"}])
    with path.open("a") as f:
        f.write('{"id": "c", "cont')  # a run killed mid-write
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    append_jsonl(path, [{"id": "c"}])  # the resumed run replaces the broken tail
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"gen\.jsonl:2: invalid JSON"):
        list(read_jsonl(path))


def test_summary_next_to_output(tmp_path) -> None:
    out = tmp_path / "pairs.jsonl"
    p = write_summary(out, "filter", seed=3, counts={"kept": 1})
    assert p == summary_path(out) == tmp_path / "pairs.summary.json"
    assert json.loads(p.read_text())["seed"] == 3


# ---------------------------------------------------------------- pipeline on a tiny random model

TINY = ["--model_size", "tiny", "--random_init", "--no_progress", "--device", "cpu"]


def test_generate_resume_skips_done_contexts_and_matches_uninterrupted(tmp_path, monkeypatch) -> None:
    import distillation.generate as gen
    from distillation.__main__ import main

    contexts = tmp_path / "contexts.jsonl"
    append_jsonl(contexts, [{"id": f"c{i}", "text": t} for i, t in
                            enumerate(["The mayor said", "Rain fell on", "Q: What is", "Police arrested"])])
    calls: list[list[str]] = []
    real = gen.sample_sentences

    def counting(model, tokenizer, prompts, *a, **k):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, *a, **k)

    monkeypatch.setattr(gen, "sample_sentences", counting)
    flags = ["--contexts", str(contexts), "--num_samples", "3", "--max_new_tokens", "6", "--keep_unfinished", *TINY]
    out = tmp_path / "gen.jsonl"
    main(["generate", *flags, "--output", str(out), "--limit", "2"])  # "interrupted" after 2 contexts
    first = list(read_jsonl(out))
    summary = main(["generate", *flags, "--output", str(out)])
    assert [c[0] for c in calls] == ["The mayor said", "Rain fell on", "Q: What is", "Police arrested"]
    records = list(read_jsonl(out))
    assert [r["id"] for r in records] == ["c0", "c1", "c2", "c3"] and records[:2] == first
    assert summary["skipped_already_done"] == 2 and summary["generated_now"] == 2
    assert all(len(r["continuations"]) == 3 for r in records)
    main(["generate", *flags, "--output", str(out)])  # all done: no model call, nothing appended
    assert len(calls) == 4 and list(read_jsonl(out)) == records
    fresh = tmp_path / "fresh.jsonl"
    main(["generate", *flags, "--output", str(fresh)])
    assert list(read_jsonl(fresh)) == records  # per-batch seeding: resuming changes nothing


def test_pipeline_contexts_generate_filter_train_on_tiny_model(tmp_path) -> None:
    from distillation.__main__ import main
    from distillation.filter_step import side_paths
    from tasks.quora_data import read_quora

    ctx, gen, pairs = tmp_path / "contexts.jsonl", tmp_path / "generations.jsonl", tmp_path / "pairs.jsonl"
    main(["contexts", "--output", str(ctx), "--num_contexts", "3", "--max_new_tokens", "6", "--keep_unfinished",
          "--batch_size", "3", *TINY])
    assert len(list(read_jsonl(ctx))) == 3
    main(["generate", "--contexts", str(ctx), "--output", str(gen), "--num_samples", "8", "--max_new_tokens", "8",
          "--contexts_per_batch", "3", "--keep_unfinished", *TINY])
    # The default threshold: an untrained scorer says ~0.5 to everything, so nothing is kept.
    s = main(["filter", "--generations", str(gen), "--output", str(pairs), "--min_ratio", "0.5",
              "--max_ratio", "2.0", *TINY])
    c = s["counts"]
    assert c["candidates"] > 0 and c["kept"] == 0
    assert sum(v for k, v in c.items() if k.startswith("removed_by")) == c["candidates"]
    scored = list(read_jsonl(side_paths(pairs)[1]))
    assert scored and len(scored) == c["removed_by_entailment"]
    # A threshold at the median score keeps about half of what the classifier saw.
    mins = sorted(min(r["forward"], r["backward"]) for r in scored)
    s = main(["filter", "--generations", str(gen), "--output", str(pairs), "--min_ratio", "0.5",
              "--max_ratio", "2.0", "--threshold", str(mins[len(mins) // 2]), *TINY])
    assert s["counts"]["kept"] >= 1 and s["negatives"] >= 1
    assert json.loads((tmp_path / "pairs.summary.json").read_text())["counts"] == s["counts"]
    out = tmp_path / "train"
    t = main(["train", "--pairs", str(pairs), "--approach", "1", "--epochs", "1", "--limit", "16",
              "--output_dir", str(out), *TINY])
    res = t["results"]["approach1"]
    pair_file = out / "approach1" / "generated-pairs.csv"
    assert pair_file.read_text().split("\n")[0] == "\tid\tsentence1\tsentence2\tis_duplicate"
    rows = read_quora(pair_file, labeled=True)
    assert len(rows) == res["rows"] == res["positives"] + res["negatives"]
    assert {r.label for r in rows} == {0, 1}
    assert 0.0 <= res["dev"]["accuracy"] <= 1.0 and Path(res["checkpoint"]).exists()
    # Self-distillation: the student (trained on the kept pairs) paraphrases, the same filters judge.
    sd = main(["self-distill", "--pairs", str(pairs), "--output", str(tmp_path / "sd.jsonl"), "--epochs", "1",
               "--limit", "3", "--num_paraphrases", "4", "--max_new_tokens", "8", "--keep_unfinished",
               "--min_ratio", "0.5", "--max_ratio", "2.0", "--threshold", str(mins[len(mins) // 2]),
               "--output_dir", str(tmp_path / "sd-runs"), *TINY])
    (r1,) = sd["rounds"]
    assert r1["sources"] == 3 and r1["counts"]["kept"] <= 3  # at most one survivor per sentence
    assert sum(v for k, v in r1["counts"].items() if k.startswith("removed_by")) + r1["counts"]["kept"] == \
        r1["counts"]["candidates"]
    assert Path(r1["generator"]).exists() and (tmp_path / "sd.summary.json").exists()


def test_first_sentence_cut() -> None:
    from distillation.sampling import first_sentence

    assert first_sentence(" Mr. Smith went to Washington. Then he left.") == "Mr. Smith went to Washington."
    assert first_sentence("It rose 3.5 percent in the U.S. market! More") == "It rose 3.5 percent in the U.S. market!"
    assert first_sentence("He said \"no.\" Then") == "He said \"no.\""
    assert first_sentence("never ends") == "" and first_sentence("never ends", keep_unfinished=True) == "never ends"
    assert first_sentence("line one\nWhat? yes") == ""  # only the first line counts


def test_train_step_passes_every_shared_flag_to_the_paraphrase_run(tmp_path, monkeypatch) -> None:
    """The engine, LoRA and speed flags of ``train`` reach the paraphrase training (they were
    dropped when the step rebuilt a command line by hand)."""
    import distillation.train
    from distillation.__main__ import main
    from distillation.filter_step import side_paths
    from distillation.records import write_jsonl

    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"s1": "A cat sat.", "s2": "A cat was sitting."}])
    write_jsonl(side_paths(pairs)[0], [{"s1": "A cat sat.", "s2": "It rained."}])
    seen = []
    monkeypatch.setattr(distillation.train, "train_paraphrase",  # tasks.paraphrase.run, as the step calls it
                        lambda s: seen.append(s) or {"dev": {}, "checkpoint": "x"})
    main(["train", "--pairs", str(pairs), "--approach", "1", "--output_dir", str(tmp_path / "out"), *TINY,
          "--weight_decay", "0.1", "--max_grad_norm", "0.5", "--group_by_length", "--lora_r", "4", "--use_dora",
          "--save_top_k", "2", "--gradient_checkpointing"])
    (s,) = seen  # the paraphrase run's typed settings (tasks.paraphrase.ParaphraseSettings)
    assert (s.train.weight_decay, s.train.max_grad_norm, s.data.group_by_length, s.flags["lora_r"],
            s.flags["use_dora"], s.train.save_top_k, s.model.gradient_checkpointing) == \
        (0.1, 0.5, True, 4, True, 2, True)
    assert (s.data.batch_size, s.train.epochs, s.train.lr, s.model.model_size, s.model.random_init) == \
        (8, 4, 1.5e-5, "tiny", True)
    assert s.para_train == str(tmp_path / "out" / "approach1" / "generated-pairs.csv")
    assert s.fine_tune.mode == "full-model" and s.loss == "answer"  # the paraphrase run's own defaults
