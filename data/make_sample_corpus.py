"""Build the shipped raw sample corpus: real-looking text plus planted problems for every pipeline stage.

    python -m data.make_sample_corpus data/sample_corpus

Deterministic for a given Python version (the clean half is the local standard library's docstrings, PSF
licence, plus synthetic news-style articles from data.samples). Planted, so that every stage of
jobs/data.py removes something: whitespace/control-only docs (normalize), too-short docs (length), symbol
junk (symbols), repeated spam (repetition), navigation/cookie boilerplate (line_quality), exact copies that
differ only in whitespace and Unicode forms (exact_dedup), copies with a few words changed (near_dedup),
docs on block-listed domains or with block-listed words (safety) and keyword salad (quality). Copies carry a
later `date` than their original, so the most-recent-wins rule keeps the copy.

Layout: three JSONL shards, one Parquet shard and one .txt shard (documents separated by blank lines). Rows
carry `id`, `text`, `url`, `date` and `kind` (the planted category; the pipeline ignores it).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

from data.samples import stdlib_docstrings, synthetic_articles

SEED = 20240326  # the InternLM2 report's arXiv date
N_ARTICLES = 1000

_SHORT = [
    "Thanks for sharing!", "Page not found.", "Loading, please wait.", "Great post, very helpful.",
    "See you at the station tomorrow.", "Nice photo.", "Comments are closed.", "Back to top",
    "Updated last week.", "No results match your search.",
]
_SYMBOLS = ["####", "$$$", "***", "==>", "|||", "@@", "%%", "&&", "+++", "---", "~~", "<<>>", "[[]]", "{}", "::",
            "1234", "0x1F", "42", "//", "^^", "!!!", "??", "=+=", "<*>"]
_SPAM = ["BUY CHEAP {item} NOW! BEST PRICE GUARANTEED!", "Limited offer on {item}, order today and save big!",
         "{item} {item} {item} best {item} deals here"]
_SPAM_ITEMS = ["watches", "sneakers", "phone cases", "sunglasses", "handbags", "headphones"]
_BOILERPLATE = [
    "Home News Sport Weather Contact us", "We use cookies to improve your experience on our website.",
    "Click here to subscribe to our newsletter.", "Sign up for free and never miss an update.",
    "Privacy Policy Terms of Use Accessibility", "Copyright 2023 Example Media Group. All rights reserved.",
    "Log in or create an account to continue.", "Please enable JavaScript to view the comments.",
    "Share this article with your friends", "Read more stories from our team",
    "Skip to content", "Powered by a popular blogging platform", "Accept all cookies or manage your settings.",
    "Terms of service apply to all downloads.",
]
_SALAD_WORDS = """widget carrot lamp quantum harbour velvet tractor pixel marble orbit saddle lemon copper glacier
ladder violin ember falcon mortar prism tundra walnut cobalt lantern meadow turbine canyon pepper anchor
cactus ribbon fossil engine blanket compass trumpet harvest rocket pebble thunder biscuit magnet oyster""".split()
_BLOCKED_SENTENCES = [
    "The comment section was flooded with adverts for viagra and cialis from anonymous accounts.",
    "Spam links promising hot singles and payday loans had to be removed from the guest book.",
    "Someone kept posting porn links and xxx adverts on the noticeboard until it was locked.",
]
_BLOCKED_HOSTS = ["www.casino-bonus.example", "cheap-pills.example", "m.spam-links.example",
                  "downloads.warez-downloads.example", "pirated-movies.example"]
_FULLWIDTH_OFFSET = 0xFEE0  # 'A' (U+0041) + offset = 'Ａ' (U+FF21); NFKC maps it back


def _date(rng: random.Random) -> dt.date:
    return dt.date(2019, 1, 1) + dt.timedelta(days=rng.randint(0, 5 * 365))


def _later(date: str, rng: random.Random) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=rng.randint(30, 400))).isoformat()


def _doc(kind: str, i: int, text: str, rng: random.Random, url: str | None = None) -> dict:
    url = url if url is not None else f"https://news.example.org/{kind}/{i}"
    return {"id": f"{kind}-{i:04d}", "text": text, "url": url, "date": _date(rng).isoformat(), "kind": kind}


def _unicode_noise(text: str, rng: random.Random) -> str:
    """Full-width letters, an fi ligature, a zero-width space and a no-break space: NFKC undoes all but the
    zero-width space, which the normalizer deletes."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = "".join(chr(ord(c) + _FULLWIDTH_OFFSET) if c.isascii() and c.isalpha() else c for c in words[i])
    text = " ".join(words).replace("fi", "\ufb01", 1)
    j = rng.randrange(1, len(text) - 1)
    return text[:j] + "\u200b" + text[j:] + "\u00a0"


def _whitespace_variant(text: str, rng: random.Random) -> str:
    """The same text after normalization: doubled spaces, CRLF line ends, trailing blanks, a tab."""
    out = text.replace(". ", ".  ", rng.randint(1, 3)).replace("\n", "\r\n")
    return "  " + out.replace(" ", "\t", 1) + "\n\n\n"


def _near_copy(text: str, rng: random.Random) -> str:
    """Replace up to 3 words of 4+ letters with other words, keeping the word 5-gram Jaccard >= 0.75 (each edit
    changes up to 5 shingles), so the copy is clearly a near-duplicate at the 0.7 threshold."""
    from data.corpus.dedup import jaccard, word_shingles

    original = word_shingles(text, 5)
    for n_edits in (3, 2, 1):
        words = text.split(" ")
        candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) >= 4]
        for i in rng.sample(candidates, n_edits):
            words[i] = rng.choice(_SALAD_WORDS)
        if jaccard(original, word_shingles(" ".join(words), 5)) >= 0.75:
            break
    return " ".join(words)


def build_docs(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    docs: list[dict] = []
    for i, text in enumerate(stdlib_docstrings()):
        docs.append(_doc("docstring", i, text, rng, url=f"https://docs.example.org/python/{i}"))
    articles = [_doc("article", i, t, rng) for i, t in enumerate(synthetic_articles(N_ARTICLES, seed))]
    for doc in rng.sample(articles, 30):
        doc["text"] = _unicode_noise(doc["text"], rng)
    docs.extend(articles)

    pool = rng.sample(articles, 145)  # distinct originals for the planted copies
    exact_src, near_src, domain_src, word_src = pool[:50], pool[50:110], pool[110:130], pool[130:145]
    for i, src in enumerate(exact_src):
        src["original"] = True
        docs.append({**_doc("exact_dup", i, _whitespace_variant(src["text"], rng), rng, url=src["url"]),
                     "date": _later(src["date"], rng), "dup_of": src["id"]})
    for i, src in enumerate(near_src):
        src["original"] = True
        docs.append({**_doc("near_dup", i, _near_copy(src["text"], rng), rng, url=src["url"]),
                     "date": _later(src["date"], rng), "dup_of": src["id"]})
    for i, src in enumerate(domain_src):
        docs.append(_doc("blocked_domain", i, src["text"], rng, url=f"https://{_BLOCKED_HOSTS[i % 5]}/page/{i}"))
        docs.remove(src)
    for i, src in enumerate(word_src):
        docs.append(_doc("blocked_words", i, src["text"] + " " + _BLOCKED_SENTENCES[i % 3], rng))
        docs.remove(src)

    empties = ["   ", "\u200b\u200b\u200b", "\t\x07\x00 \n\n \u00a0", "\ufeff", "\r\n\r\n", "\x0c\x1b[0m"]
    docs += [_doc("empty", i, t, rng) for i, t in enumerate(empties)]
    docs += [_doc("too_short", i, rng.choice(_SHORT), rng) for i in range(30)]
    for i in range(25):
        lines = [" ".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(8, 14))) for _ in range(rng.randint(3, 5))]
        docs.append(_doc("symbol_junk", i, "\n".join(lines), rng))
    for i in range(25):
        line = rng.choice(_SPAM).format(item=rng.choice(_SPAM_ITEMS))
        docs.append(_doc("spam", i, "\n".join([line] * rng.randint(8, 15)), rng))
    for i in range(25):
        lines = rng.sample(_BOILERPLATE, rng.randint(6, 9))
        lines.insert(rng.randrange(len(lines)), "The bakery on the corner reopens next week after a long repair.")
        docs.append(_doc("boilerplate", i, "\n".join(lines), rng))
    for i in range(40):
        lines = [" ".join(rng.choice(_SALAD_WORDS) for _ in range(rng.randint(18, 30))) + "." for _ in range(3)]
        docs.append(_doc("word_salad", i, "\n".join(lines), rng))
    rng.shuffle(docs)
    return docs


def _txt_ok(doc: dict) -> bool:
    # .txt carries no id/url/date, and blank lines separate its documents: only self-contained prose goes there.
    return doc["kind"] in ("article", "docstring", "too_short", "word_salad") and not doc.get("original")


def split_shards(docs: list[dict]) -> dict[str, list[dict]]:
    txt = [d for d in docs if _txt_ok(d)][:150]
    taken = {id(d) for d in txt}
    rest = [d for d in docs if id(d) not in taken]
    n_parquet = len(rest) // 5
    jsonl = rest[n_parquet:]
    third = -(-len(jsonl) // 3)
    return {
        "part-0000.jsonl": jsonl[:third], "part-0001.jsonl": jsonl[third : 2 * third],
        "part-0002.jsonl": jsonl[2 * third :], "part-0003.parquet": rest[:n_parquet], "part-0004.txt": txt,
    }


def _row(doc: dict) -> dict:
    return {k: doc[k] for k in ("id", "text", "url", "date", "kind")}


def write_corpus(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = split_shards(build_docs(seed))
    for name, docs in shards.items():
        path = out_dir / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(_row(d), ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        elif name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist([_row(d) for d in docs]), path, compression="zstd")
        else:
            blocks = ["\n".join(line for line in d["text"].splitlines() if line.strip()) for d in docs]
            path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    # Which doc each planted copy duplicates, so tests can check the most-recent-wins rule.
    pairs = {d["id"]: d["dup_of"] for docs in shards.values() for d in docs if "dup_of" in d}
    (out_dir / "planted_duplicates.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(pairs.items())))
    counts: dict[str, int] = {}
    for docs in shards.values():
        for d in docs:
            counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    table = "".join(f"| {k} | {v} |\n" for k, v in sorted(counts.items()))
    files = "".join(f"| {name} | {len(docs)} |\n" for name, docs in shards.items())
    (out_dir / "README.md").write_text(
        "# Sample raw corpus\n\nGenerated by `python -m data.make_sample_corpus data/sample_corpus` (do not edit by "
        "hand); read by `python jobs/data.py`. Planted problems and the stage meant to catch them are described in "
        "data/make_sample_corpus.py. `planted_duplicates.tsv` maps each planted copy to its (older) original.\n\n"
        f"| file | docs |\n|---|---|\n{files}\n| kind | docs |\n|---|---|\n{table}"
    )
    return {name: len(docs) for name, docs in shards.items()} | {f"kind:{k}": v for k, v in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for key, value in write_corpus(args.out_dir, args.seed).items():
        print(f"{key}\t{value}")


if __name__ == "__main__":
    main()
