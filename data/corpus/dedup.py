"""Exact and MinHash-LSH near-duplicate removal (InternLM2 "Dedup data").

Signatures are computed in parallel (per batch, `minhash_signature`), then ONE `GlobalDedup` instance sees
every document in order (Ray Data runs it as a stateful map_batches class with concurrency=1), so duplicates
are found across the whole corpus, not within a block. The first document of a cluster to arrive is kept;
jobs/data.py sorts by recency first so that this is the most recent one (the report keeps the newest dump).
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np

from data.corpus.config import DedupConfig, NearDedupConfig

_WORD = re.compile(r"\w+")


def exact_hash(text: str) -> str:
    """128-bit BLAKE2b of the normalized text: equal texts <=> equal hashes (collisions are negligible)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def word_shingles(text: str, n: int) -> set[str]:
    """Lower-cased word n-grams; a document shorter than n words is one shingle (so it can still match itself)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B|."""
    return len(a & b) / len(a | b) if a or b else 1.0


@lru_cache(maxsize=4)
def _permutations(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed).permutations


def minhash_signature(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """datasketch MinHash (scheme affine32) over the word n-gram shingles: uint32[num_perm]."""
    from datasketch import MinHash

    # Drawing the permutations is half the cost of a fresh MinHash; they depend only on (num_perm, seed).
    perms = _permutations(cfg.num_perm, cfg.seed)
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, permutations=perms, scheme="affine32")
    m.update_batch([s.encode("utf-8") for s in word_shingles(text, cfg.ngram)])
    return m.hashvalues.astype(np.uint32)


def signature_to_bytes(sig: np.ndarray) -> bytes:
    return np.asarray(sig, dtype=np.uint32).tobytes()


def signature_from_bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint32)


class BandIndex:
    """MinHash LSH banding over uint32 signatures: slots [i*rows, (i+1)*rows) form band i, and a stored signature is
    a candidate for a query when any band is equal. A pair with Jaccard J becomes a candidate with probability
    1 - (1 - J^rows)^bands. Each band has its own table keyed by the band's raw bytes, so two bands collide only
    when they are equal; candidates come back in the order they were inserted, so the output is deterministic.

    datasketch's MinHashLSH bands the same way (tests check the candidates agree) but needs a MinHash object per
    document and byte-swaps every band on each call; in the pipeline's one serial stage that cost 3-4x the look-ups
    themselves, which capped the 2-CPU speed-up under the 1.8x the corpus bench asks for (bench/data_pipeline.py).
    """

    def __init__(self, bands: int, rows: int):
        if bands < 1 or rows < 1:
            raise ValueError(f"BandIndex needs bands >= 1 and rows >= 1 (got {bands} x {rows})")
        self.bands, self.rows = bands, rows
        self.tables: list[dict[bytes, list[str]]] = [{} for _ in range(bands)]  # one per band: band bytes -> keys

    def band_keys(self, sig: np.ndarray) -> list[bytes]:
        if sig.shape[0] < self.bands * self.rows:
            raise ValueError(f"signature has {sig.shape[0]} slots; {self.bands} bands x {self.rows} rows need "
                             f"{self.bands * self.rows}")
        raw = np.ascontiguousarray(sig[: self.bands * self.rows], dtype=np.uint32).tobytes()
        width = 4 * self.rows
        return [raw[i : i + width] for i in range(0, len(raw), width)]

    def candidates(self, keys: list[bytes]) -> list[str]:
        found: dict[str, None] = {}
        for table, k in zip(self.tables, keys):
            for key in table.get(k, ()):
                found[key] = None
        return list(found)

    def insert(self, key: str, keys: list[bytes]) -> None:
        for table, k in zip(self.tables, keys):
            bucket = table.get(k)
            if bucket is None:
                table[k] = [key]
            else:
                bucket.append(key)


def lsh_params(near: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows) from the config; 0 x 0 takes datasketch's choice for the threshold (false positives and
    negatives weighted equally)."""
    if near.bands:
        return near.bands, near.rows
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=near.threshold, num_perm=near.num_perm)
    return lsh.b, lsh.r


class GlobalDedup:
    """Stateful exact + near-duplicate filter over batches that arrive in corpus order.

    Rows with a non-empty drop_stage pass through untouched. A kept row must carry `doc_hash` (exact_hash of its
    text) and `signature` (signature_to_bytes of its MinHash). Estimated Jaccard of two signatures is the share of
    equal slots: J^ = (1/k) * sum_i [h_i(A) == h_i(B)], an unbiased estimate of J(A, B) for k permutations.
    """

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.index = BandIndex(*lsh_params(cfg.near))
        self.first_with_hash: dict[str, str] = {}
        self.signatures: dict[str, np.ndarray] = {}  # kept doc key -> signature, for candidate verification

    def _near_duplicate_of(self, keys: list[bytes], sig: np.ndarray) -> tuple[str, float] | None:
        near = self.cfg.near
        best: tuple[str, float] | None = None
        for key in self.index.candidates(keys):
            est = float(np.mean(self.signatures[key] == sig))
            if (not near.verify or est >= near.threshold) and (best is None or est > best[1]):
                best = (key, est)
        return best

    def decide(self, doc_id: str, doc_hash: str, signature: bytes) -> tuple[str, str] | None:
        """(stage, reason) when the document is a duplicate of one seen before, else None (and it is indexed)."""
        if self.cfg.exact.enabled:
            first = self.first_with_hash.get(doc_hash)
            if first is not None:
                return "exact_dedup", f"exact duplicate of {first}"
            self.first_with_hash[doc_hash] = doc_id
        if self.cfg.near.enabled:
            sig = signature_from_bytes(signature)
            keys = self.index.band_keys(sig)
            match = self._near_duplicate_of(keys, sig)
            if match is not None:
                key, est = match
                return "near_dedup", f"near-duplicate of {key.split('|', 1)[1]} (estimated Jaccard {est:.2f})"
            # Index keys are our own counters: input ids need not be unique.
            key = f"{len(self.signatures)}|{doc_id}"
            self.index.insert(key, keys)
            self.signatures[key] = sig
        return None

    def __call__(self, batch: dict) -> dict:
        stages, reasons = list(batch["drop_stage"]), list(batch["drop_reason"])
        for i, stage in enumerate(stages):
            if stage:
                continue
            verdict = self.decide(str(batch["id"][i]), str(batch["doc_hash"][i]), batch["signature"][i])
            if verdict is not None:
                stages[i], reasons[i] = verdict
        return {**batch, "drop_stage": np.array(stages, dtype=object), "drop_reason": np.array(reasons, dtype=object)}
