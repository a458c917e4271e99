"""Each corpus stage on tiny hand-made inputs whose outcome is counted by hand in the comments."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.corpus import (
    CorpusConfig,
    CorpusDataError,
    DedupConfig,
    ExactDedupConfig,
    InputConfig,
    LengthConfig,
    LineQualityConfig,
    NearDedupConfig,
    QualityConfig,
    RepetitionConfig,
    SafetyConfig,
    SymbolConfig,
    GlobalDedup,
    discover_files,
    iter_file_rows,
    jaccard,
    word_shingles,
)
from data.corpus.filters import (
    duplicate_line_stats,
    length_reason,
    line_quality_reason,
    line_quality_stats,
    normalize_text,
    repetition_reason,
    symbol_stats,
    symbols_reason,
    top_ngram_char_fraction,
)
from data.corpus.quality import heuristic_quality_score, quality_signals, score_texts
from data.corpus.safety import blocked_domain, blocked_word_hits, safety_reason
from data.corpus.stages import build_report, late_stages, rule_stages, summarize_batch
from data.io import DataError


def _batch(texts: list[str], urls: list[str] | None = None) -> dict:
    n = len(texts)
    return {
        "id": [f"d{i}" for i in range(n)], "text": list(texts), "url": urls or [""] * n, "date": [""] * n,
        "source": ["mem"] * n, "line": list(range(1, n + 1)), "drop_stage": [""] * n, "drop_reason": [""] * n,
    }


# ---------------------------------------------------------------------------------------------- normalize


def test_normalize_nfkc_invisible_chars_and_whitespace():
    # NFKC: full-width "ＡＢＣ" -> "ABC", ligature "ﬁ" -> "fi", no-break space -> space; the zero-width space and
    # BEL are deleted; the tab and double spaces collapse; CRLF -> LF; 3 blank lines -> 1; ends stripped.
    raw = "  ＡＢＣ ﬁle\u200b\tword\u00a0 x\r\n\r\n\r\n\r\nnext  line  \x07"
    assert normalize_text(raw) == "ABC file word x\n\nnext line"


PROSE = ("The river rose after the storm, and farmers moved their sheep to higher ground. By evening the water "
         "had reached the old mill, but nobody was hurt.")


def test_rule_stages_drop_docs_empty_after_normalization():
    out = rule_stages(_batch(["\u200b\t\x00 \n\n\u00a0", "  " + PROSE.replace(" ", "\u00a0", 3)]), CorpusConfig())
    assert list(out["drop_stage"]) == ["normalize", ""]
    assert out["drop_reason"][0] == "empty after normalization"
    assert out["text"][1] == PROSE  # the normalized text flows on
    assert out["doc_hash"][1] and len(out["signature"][1]) == 128 * 4  # dedup keys: 128 uint32 slots
    assert out["doc_hash"][0] == "" and out["signature"][0] == b""


# ---------------------------------------------------------------------------------------------- rule filters


def test_length_filter_counts_whitespace_words():
    cfg = LengthConfig(min_words=5, max_words=8)
    assert length_reason("one two three", cfg) == "too short: 3 words < min_words 5"
    assert length_reason("one two three four five", cfg) is None
    assert length_reason(" ".join(["w"] * 9), cfg) == "too long: 9 words > max_words 8"


def test_symbol_stats_by_hand():
    # words: "##" "hello" "world" "..." "42" -> 2 of 5 contain a letter: 0.4
    # symbols: '#' x2 + '...' x1 = 3 per 5 words: 0.6
    # non-space chars 2+5+5+3+2 = 17, letters 10: non-alpha fraction 7/17
    s = symbol_stats("## hello world ... 42")
    assert s["alpha_word_fraction"] == pytest.approx(0.4)
    assert s["symbol_word_ratio"] == pytest.approx(0.6)
    assert s["non_alpha_char_fraction"] == pytest.approx(7 / 17)
    assert symbols_reason("## hello world ... 42", SymbolConfig()) == "alpha word fraction 0.40 < 0.7"
    assert symbols_reason("a plain sentence of words.", SymbolConfig()) is None


def test_duplicate_lines_by_hand():
    # lines "a b", "c d", "a b", "a b": the last two repeat an earlier line -> 2/4 lines, 6 of 12 chars
    assert duplicate_line_stats("a b\nc d\na b\na b\n") == (0.5, 0.5)


def test_top_ngram_coverage_by_hand():
    words = "the cat the cat sat".split()
    # bigrams: (the, cat) x2, (cat, the), (cat, sat): top covers 2 * (3 + 3) = 12 of 15 word chars
    assert top_ngram_char_fraction(words, 2) == pytest.approx(12 / 15)
    # every trigram occurs once: no repetition
    assert top_ngram_char_fraction(words, 3) == 0.0


def test_repetition_filter_catches_spam_and_keeps_prose():
    cfg = RepetitionConfig()
    spam = "\n".join(["Buy cheap watches now!"] * 6 + ["Contact us today."])
    assert repetition_reason(spam, cfg) == "duplicate line fraction 0.71 > 0.3"  # 5 of 7 lines repeat
    prose = "The river rose after the storm. Farmers moved their sheep to higher ground before nightfall."
    assert repetition_reason(prose, cfg) is None


def test_line_quality_by_hand():
    text = "Welcome to the site.\nClick here to subscribe\nWe use cookies\nA normal line without an end"
    # 4 lines: 1 ends in punctuation (0.25); lines 2 and 3 hold boilerplate phrases (0.5)
    stats = line_quality_stats(text, tuple(LineQualityConfig().boilerplate_phrases))
    assert stats["terminal_punct"] == 0.25 and stats["boilerplate"] == 0.5
    assert line_quality_reason(text, LineQualityConfig()) == "boilerplate line fraction 0.50 > 0.2"
    # phrases match whole words only: "cookiecutter" is not a cookie banner
    assert line_quality_stats("Use cookiecutter.", ("cookie",))["boilerplate"] == 0.0
    no_punct = "first line\nsecond line\nthird line\nfourth line\nfifth line."
    assert line_quality_reason(no_punct, LineQualityConfig()) is None  # 1/5 = 0.2 is not below 0.2
    assert "lines ending in punctuation 0.00" in line_quality_reason("a\nb\nc", LineQualityConfig())


# ---------------------------------------------------------------------------------------------- dedup

_BASE = [f"w{i:02d}" for i in range(40)]


def _variant(n_replaced: int) -> str:
    return " ".join(_BASE[: 40 - n_replaced] + [f"x{i:02d}" for i in range(n_replaced)])


def _dedup_only(cfg: DedupConfig) -> CorpusConfig:
    """Rule filters off, so the synthetic word lists reach the dedup stage."""
    return CorpusConfig(
        length=LengthConfig(enabled=False), symbols=SymbolConfig(enabled=False),
        repetition=RepetitionConfig(enabled=False), line_quality=LineQualityConfig(enabled=False), dedup=cfg,
    )


def _dedup_batch(texts: list[str], cfg: DedupConfig) -> dict:
    return GlobalDedup(cfg)(rule_stages(_batch(texts), _dedup_only(cfg)))


def test_shingle_jaccard_of_the_planted_pairs():
    # 40 distinct words -> 36 word 5-grams. Replacing the last k words keeps the 5-grams inside the first 40 - k
    # words: 36 - k shared, union 36 + k, so J = (36 - k) / (36 + k): k = 4 -> 32/40 = 0.8, k = 12 -> 24/48 = 0.5.
    base = word_shingles(" ".join(_BASE), 5)
    assert len(base) == 36
    assert jaccard(base, word_shingles(_variant(4), 5)) == pytest.approx(0.8)
    assert jaccard(base, word_shingles(_variant(12), 5)) == pytest.approx(0.5)


def test_near_dedup_removes_jaccard_08_and_keeps_05():
    out = _dedup_batch([" ".join(_BASE), _variant(4), _variant(12)], DedupConfig())
    assert list(out["drop_stage"]) == ["", "near_dedup", ""]
    assert out["drop_reason"][1].startswith("near-duplicate of d0 (estimated Jaccard 0.")
    estimated = float(out["drop_reason"][1].split("Jaccard ")[1].rstrip(")"))
    assert abs(estimated - 0.8) < 0.1  # 128-slot MinHash estimate of the true 0.8 (std ~ 0.035)


def _sig(values) -> bytes:
    return np.asarray(values, dtype=np.uint32).tobytes()


def test_near_dedup_candidates_need_one_whole_band_equal():
    # 128 slots, 25 bands x 5 rows (slots 0-124). B differs from A in slot 5i of every band but band 3: 104 of 128
    # slots equal (J^ = 0.8125) and band 3 whole, so it is a candidate and a duplicate. C differs in slot 5i of every
    # band: 103 of 128 equal (0.80), but no band is whole, so LSH never proposes it and it is kept; that is the miss
    # rate 1 - P(J) the bands x rows choice accepts.
    a = np.arange(128)
    b, c = a.copy(), a.copy()
    b[[5 * i for i in range(25) if i != 3]] += 1000
    c[[5 * i for i in range(25)]] += 1000
    dedup = GlobalDedup(DedupConfig())
    assert dedup.decide("a", "ha", _sig(a)) is None
    assert dedup.decide("b", "hb", _sig(b)) == ("near_dedup", "near-duplicate of a (estimated Jaccard 0.81)")
    assert dedup.decide("c", "hc", _sig(c)) is None


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_near_dedup_names_the_earliest_kept_doc_when_two_match_equally(order):
    # 16 slots, 4 bands x 4 rows. A = 0..15; B = A with slots 8-15 moved: J^(A, B) = 0.5, so B is kept beside A.
    # Q = A with slots 12-15 moved as B's are: J^(Q, A) = 12/16 and J^(Q, B) = 12/16 (slots 0-7 and 12-15), a tie,
    # so the reason names whichever of the two was kept first, not whichever a hash order happens to list first.
    near = NearDedupConfig(num_perm=16, bands=4, rows=4)
    base = np.arange(16)
    sigs = {"a": base, "b": np.where(base >= 8, base + 100, base)}
    query = np.where(base >= 12, base + 100, base)
    dedup = GlobalDedup(DedupConfig(near=near))
    for doc in order:
        assert dedup.decide(doc, "h" + doc, _sig(sigs[doc])) is None
    reason = f"near-duplicate of {order[0]} (estimated Jaccard 0.75)"
    assert dedup.decide("q", "hq", _sig(query)) == ("near_dedup", reason)


@pytest.mark.parametrize("params", [(25, 5), (0, 0)])
def test_band_index_proposes_the_same_candidates_as_datasketch_lsh(params):
    # The serial dedup stage bands signatures itself (no MinHash object per document); datasketch's MinHashLSH with
    # the same bands x rows (or its own choice for the threshold, 0 x 0) is the reference. Values are drawn from a
    # small range so that bands collide often.
    from datasketch import MinHash, MinHashLSH

    from data.corpus.dedup import BandIndex, lsh_params

    near = NearDedupConfig(bands=params[0], rows=params[1])
    bands, rows = lsh_params(near)
    rng = np.random.default_rng(0)
    ref = MinHashLSH(threshold=near.threshold, num_perm=128, params=(bands, rows))
    index = BandIndex(bands, rows)
    proposed = 0
    for i in range(300):
        sig = rng.integers(0, 2, size=128).astype(np.uint32)
        m = MinHash(num_perm=128, hashvalues=sig, scheme="affine32")
        keys = index.band_keys(sig)
        assert set(index.candidates(keys)) == set(ref.query(m)), f"signature {i}"
        proposed += len(index.candidates(keys))
        index.insert(str(i), keys)
        ref.insert(str(i), m)
    assert proposed > 1000  # the check compared real candidate lists, not empty ones


def test_near_dedup_off_keeps_near_duplicates():
    out = _dedup_batch([" ".join(_BASE), _variant(4)], DedupConfig(near=NearDedupConfig(enabled=False)))
    assert list(out["drop_stage"]) == ["", ""]


def test_exact_dedup_is_global_across_batches():
    # One GlobalDedup sees two batches: the copy in the second batch (different whitespace, same normalized
    # text) is removed as an exact duplicate of the first batch's document.
    cfg = DedupConfig(near=NearDedupConfig(enabled=False))
    corpus_cfg = _dedup_only(cfg)
    dedup = GlobalDedup(cfg)
    first = dedup(rule_stages(_batch(["alpha beta gamma.", "delta epsilon."]), corpus_cfg))
    second = _batch(["zeta eta.", "alpha   beta\tgamma.  "])
    second["id"] = ["e0", "e1"]
    second = dedup(rule_stages(second, corpus_cfg))
    assert list(first["drop_stage"]) == ["", ""]
    assert list(second["drop_stage"]) == ["", "exact_dedup"]
    assert second["drop_reason"][1] == "exact duplicate of d0"


def test_exact_and_near_dedup_can_be_switched_off():
    cfg = DedupConfig(exact=ExactDedupConfig(enabled=False), near=NearDedupConfig(enabled=False))
    out = _dedup_batch(["same text here.", "same text here."], cfg)
    assert list(out["drop_stage"]) == ["", ""]


# ---------------------------------------------------------------------------------------------- safety


def test_domain_blocklist_covers_subdomains_only(tmp_path):
    domains = frozenset({"casino-bonus.example"})
    assert blocked_domain("https://www.casino-bonus.example/page", domains) == "casino-bonus.example"
    assert blocked_domain("http://a.b.casino-bonus.example:8080/x", domains) == "casino-bonus.example"
    assert blocked_domain("https://casino-bonus.example.org/", domains) is None  # another domain
    assert blocked_domain("https://notcasino-bonus.example/", domains) is None


def test_word_blocklist_phrases_and_min_hits(tmp_path):
    words = frozenset({"viagra", "payday loans"})
    hits = blocked_word_hits("Get PAYDAY loans and Viagra, viagra!", words)
    assert sorted(hits) == ["payday loans", "viagra", "viagra"]
    (tmp_path / "d.txt").write_text("# comment\nbad.example\n")
    (tmp_path / "w.txt").write_text("viagra\npayday loans  # phrase\n")
    cfg = SafetyConfig(domain_blocklist=str(tmp_path / "d.txt"), word_blocklist=str(tmp_path / "w.txt"))
    assert safety_reason("nothing bad", "https://x.bad.example/", cfg) == "blocked domain bad.example"
    assert safety_reason("one viagra mention", "", cfg) is None  # 1 hit < min_blocked_word_hits = 2
    assert safety_reason("viagra and payday loans", "", cfg) == "2 blocked word hits >= 2 (payday loans, viagra)"


def test_shipped_blocklists_load_and_block():
    cfg = SafetyConfig()  # "" = data/blocklists/*.txt
    assert safety_reason("fine text", "https://m.spam-links.example/a", cfg) == "blocked domain spam-links.example"
    assert safety_reason("fine text", "https://docs.python.org/3/", cfg) is None


# ---------------------------------------------------------------------------------------------- quality


def test_quality_signals_by_hand():
    cfg = QualityConfig()
    # 9 tokens; stop words the, on, the, it, was = 5/9 = 0.56 >= target 0.3 -> 1
    # mean token length (3+3+3+2+3+3+2+3+5)/9 = 3 -> inside [3, 10] -> 1; all words alphabetic -> 1
    # two capitalised sentences of 6 and 3 words ending in '.' -> all 9 words in good sentences -> 1
    good = "The cat sat on the mat. It was happy."
    assert quality_signals(good, cfg) == {"stopword": 1.0, "word_len": 1.0, "alpha": 1.0, "sentence": 1.0}
    # keyword salad: no stop words (0), mean length 36/6 = 6 (1), alphabetic (1), one lower-case "sentence" (0)
    salad = "widget carrot lamp quantum harbour velvet."
    assert quality_signals(salad, cfg) == {"stopword": 0.0, "word_len": 1.0, "alpha": 1.0, "sentence": 0.0}
    assert heuristic_quality_score(salad, cfg) == pytest.approx(0.5)  # (0 + 1 + 1 + 0) / 4
    # weights: only the stop-word signal counts -> the score is that signal
    assert heuristic_quality_score(salad, QualityConfig(word_length_weight=0, alpha_weight=0, sentence_weight=0)) == 0


def test_late_stages_apply_safety_then_quality_threshold():
    texts = ["The cat sat on the mat. It was happy.", "widget carrot lamp quantum harbour velvet.",
             "The dog sat on the rug. It was calm."]
    out = late_stages(_batch(texts, urls=["", "", "https://www.casino-bonus.example/"]), CorpusConfig())
    assert list(out["drop_stage"]) == ["", "quality", "safety"]
    assert out["drop_reason"][1] == "quality score 0.50 < threshold 0.6"
    assert out["quality_score"][0] == pytest.approx(1.0) and out["quality_score"][2] == -1.0


def test_pluggable_scorer_class_built_once(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "class LengthScorer:\n"
        "    built = 0\n"
        "    def __init__(self):\n"
        "        LengthScorer.built += 1\n"
        "    def __call__(self, texts):\n"
        "        return [min(1.0, len(t) / 100) for t in texts]\n"
        "def broken(texts):\n"
        "    return [2.0 for t in texts]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = QualityConfig(scorer="my_scorer:LengthScorer")
    assert score_texts(["x" * 50, "y" * 300], cfg) == [0.5, 1.0]
    score_texts(["z"], cfg)
    import my_scorer

    assert my_scorer.LengthScorer.built == 1
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        score_texts(["a"], QualityConfig(scorer="my_scorer:broken"))
    with pytest.raises(ValueError, match="cannot be loaded"):
        score_texts(["a"], QualityConfig(scorer="my_scorer:missing"))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: SymbolConfig(min_alpha_word_fraction=1.5), "corpus.symbols.min_alpha_word_fraction"),
        (lambda: LengthConfig(min_words=10, max_words=5), "min_words <= max_words"),
        (lambda: NearDedupConfig(bands=30, rows=5), "exceeds num_perm"),
        (lambda: NearDedupConfig(bands=16, rows=0), "set both bands and rows"),
        (lambda: NearDedupConfig(threshold=1.0), "corpus.dedup.near.threshold"),
        (lambda: QualityConfig(scorer="mymodel"), "package.module:name"),
        (lambda: DedupConfig(keep="newest"), "corpus.dedup.keep"),
        (lambda: InputConfig(on_error="ignore"), "input.on_error"),
        (lambda: InputConfig(txt_docs="paragraph"), "input.txt_docs"),
    ],
)
def test_config_validation_names_the_key(build, key):
    with pytest.raises(ValueError, match=key.replace(".", "\\.").replace("[", "\\[")):
        build()


# ---------------------------------------------------------------------------------------------- reading


def _rows(path, fmt: str, **kw) -> list[dict]:
    return list(iter_file_rows(str(path), fmt, InputConfig(**kw)))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "shard.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=f"{path}:3: is not valid JSON"):
        _rows(path, "jsonl")
    rows = _rows(path, "jsonl", on_error="skip")
    assert [r["drop_stage"] for r in rows] == ["", "read", "read"]
    assert rows[1]["drop_reason"].startswith(f"{path}:3: is not valid JSON")
    assert rows[2]["drop_reason"].startswith(f"{path}:4: field 'text' is missing (row has keys: body)")
    assert rows[0]["id"] == "shard.jsonl:1" and rows[0]["line"] == 1


def test_corpus_data_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(CorpusDataError("f.jsonl", 7, "text", "is missing")))
    assert isinstance(err, DataError) and (err.path, err.line, err.field_name) == ("f.jsonl", 7, "text")
    assert str(err) == "f.jsonl:7: field 'text' is missing"


def test_row_fields_ids_urls_and_dates(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"id": 9, "text": "t", "url": "https://x.org", "dump": 42, "extra": [1]}) + "\n")
        f.write(json.dumps({"text": "u", "date": "2023-05-01", "dump": 7}) + "\n")
        f.write(json.dumps({"text": 5}) + "\n")
    rows = _rows(path, "jsonl", on_error="skip")
    assert rows[0] | {"source": ""} == {
        "id": "9", "text": "t", "url": "https://x.org", "date": "0" * 18 + "42", "source": "", "line": 1,
        "drop_stage": "", "drop_reason": "",
    }
    assert rows[1]["date"] == "2023-05-01"  # the first of date_fields present wins
    assert rows[2]["drop_reason"].endswith("field 'text' must be a string, got int")


def test_json_array_parquet_and_txt(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}, "three"]))
    rows = _rows(tmp_path / "arr.json", "json", on_error="skip")
    assert [r["text"] for r in rows] == ["one", "two", ""] and rows[2]["drop_stage"] == "read"

    pq.write_table(pa.table({"text": ["p1", None], "url": ["https://a.org", None]}), tmp_path / "p.parquet")
    rows = _rows(tmp_path / "p.parquet", "parquet", on_error="skip")
    assert rows[0]["text"] == "p1" and rows[0]["url"] == "https://a.org"
    assert rows[1]["drop_reason"] == f"{tmp_path / 'p.parquet'}:2: field 'text' is null; every row needs a text string"
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match="q.parquet: field 'text' column is missing \\(columns: body\\)"):
        _rows(tmp_path / "q.parquet", "parquet")

    (tmp_path / "docs.txt").write_text("first doc\nstill first\n\n\n  \nsecond doc\n")
    rows = _rows(tmp_path / "docs.txt", "txt")
    assert [(r["line"], r["text"]) for r in rows] == [(1, "first doc\nstill first"), (6, "second doc")]
    assert len(_rows(tmp_path / "docs.txt", "txt", txt_docs="file")) == 1


def test_discover_files_by_extension(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("")
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "notes.md").write_text("")
    found = discover_files([str(tmp_path)])
    assert found == [(str(tmp_path / "a.parquet"), "parquet"), (str(tmp_path / "sub" / "b.jsonl"), "jsonl")]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.csv").write_text("")
    with pytest.raises(FileNotFoundError, match="holds no readable file"):
        discover_files([str(tmp_path / "only")])


# ---------------------------------------------------------------------------------------------- report


def test_report_chains_stage_counts():
    batch = _batch(["a", "b", "c", "d", "e"])
    batch["drop_stage"] = np.array(["read", "length", "", "length", "quality"], dtype=object)
    batch["drop_reason"] = np.array(["bad json", "too short", "", "too short", "low"], dtype=object)
    parts = summarize_batch(batch, 1)["part"] + summarize_batch(_batch(["f"]), 1)["part"]
    report = build_report(parts, 1)
    # 6 rows, 1 malformed -> 5 docs in; length removes 2 of 5, quality 1 of the 3 left -> 2 out
    assert (report["docs_in"], report["malformed_rows"], report["docs_out"]) == (5, 1, 2)
    by_stage = {s["stage"]: s for s in report["stages"]}
    assert (by_stage["length"]["input"], by_stage["length"]["kept"], by_stage["length"]["removed"]) == (5, 3, 2)
    assert by_stage["length"]["examples"] == [{"id": "d1", "reason": "too short", "text": "b"}]  # max_examples=1
    assert (by_stage["quality"]["input"], by_stage["quality"]["removed"]) == (3, 1)


def test_fsspec_urls_are_discovered_and_read():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/a.jsonl", b'{"text": "from memory"}\n')
    fs.pipe("/corpus/skip.csv", b"x")
    found = discover_files(["memory://corpus"])
    assert found == [("memory:///corpus/a.jsonl", "jsonl")]  # fsspec's canonical URL of that file
    assert [r["text"] for r in iter_file_rows(*found[0], InputConfig())] == ["from memory"]
