"""all-MiniLM-L6-v2 sentence embeddings, offline from the pinned asset, remembered on disk.

Embedding is the slow part of the learned judges on a CPU (~20 ms a text on 2 cores), and the same responses are
embedded again by every retraining and every second judge, so vectors are kept in <VLSAFE_CACHE>/embeddings.sqlite
keyed by (embedder files' sha256, max length, text).
"""

from __future__ import annotations

import functools
import hashlib
import sqlite3

import numpy as np

ASSET = "all-minilm-l6-v2"
MAX_TOKENS = 128  # the opening and the head of a response are what the judges read; longer costs time only


class Embedder:
    def __init__(self, max_tokens: int = MAX_TOKENS):
        from vlsafe import assets

        asset = assets.get(ASSET)
        assets.raise_for_failures(assets.verify(ASSET))
        self.version = hashlib.sha256("".join(sorted(asset.sha256.values())).encode()).hexdigest()[:16]
        self.max_tokens = max_tokens
        self.path = assets.asset_files(ASSET)[0]
        self._model = None
        self._memo: dict[str, np.ndarray] = {}
        db_path = assets.cache_dir() / "embeddings.sqlite"
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)")

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
            self._model.max_seq_length = self.max_tokens
        return self._model

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.version}:{self.max_tokens}:{text}".encode()).hexdigest()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        keys = [self._key(t) for t in texts]
        missing = [k for k in dict.fromkeys(keys) if k not in self._memo]
        for start in range(0, len(missing), 500):
            chunk = missing[start:start + 500]
            rows = self._db.execute(f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})",
                                    chunk)
            self._memo.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in self._memo))
        if todo:
            vectors = self.model.encode(todo, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            fresh = {self._key(t): v.astype(np.float32) for t, v in zip(todo, vectors)}
            self._memo.update(fresh)
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO vectors VALUES (?, ?)",
                                 [(k, v.tobytes()) for k, v in fresh.items()])
            self._db.execute("COMMIT")
        return np.stack([self._memo[k] for k in keys]) if keys else np.zeros((0, 384), np.float32)


@functools.cache
def embedder() -> Embedder:
    return Embedder()
