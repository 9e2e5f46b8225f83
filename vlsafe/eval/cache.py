"""Generate once, judge many: a SQLite store of generations and of the judgements made on them.

A generation is keyed by everything that can change the words a model writes: the model's content hash (weights
plus chat template), the prompt text, the system prompt, the image's sha256, the decoding settings and the
backend. A judgement is keyed by (judgement key, judge name, judge version): the judgement key hashes the generation
key with the request and the response the judge read (`judgement_key`), so a response generated again (a fault
fixed, a row that once came back empty) is judged again rather than given the old response's verdict; the version
hashes whatever defines the judge (pattern file, classifier weights, prompt template + judge model), so editing a
judge never serves stale verdicts.

Several evaluations may write at once (e.g. one per checkpoint of a sweep): WAL mode lets readers and one writer
proceed together, `busy_timeout` makes a second writer wait instead of failing, every write is one
`BEGIN IMMEDIATE` transaction (a batch lands whole or not at all), opening a fresh file is retried while another
process sets it up, and rows are immutable (INSERT OR IGNORE: two writers producing the same key wrote the same
thing, so whichever lands first stays). tests/test_cache.py runs two writer processes against one file.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from pathlib import Path

from vlsafe.errors import VlsafeError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, prompt TEXT NOT NULL, system TEXT, image_sha256 TEXT,
    decoding TEXT NOT NULL, backend TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS judgements (
    generation TEXT NOT NULL, judge TEXT NOT NULL, version TEXT NOT NULL, verdict TEXT NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (generation, judge, version));
"""


def default_path() -> Path:
    from vlsafe.assets import cache_dir

    return cache_dir() / "eval.sqlite"


def generation_key(model: str, prompt: str, system: str | None, image_sha256: str | None, decoding: str,
                   backend: str) -> str:
    """sha256 over the fields as a JSON list: unambiguous, unlike joining strings with a separator."""
    fields = [model, prompt, system, image_sha256, decoding, backend]
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()


def judgement_key(generation: str, request: str, response: str) -> str:
    """What a verdict is keyed by: the generation it judged and the very words it read (request and response)."""
    return hashlib.sha256(json.dumps([generation, request, response], ensure_ascii=False).encode()).hexdigest()


class Cache:
    def __init__(self, path: str | Path | None = None, timeout_s: float = 60.0):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open(timeout_s)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise VlsafeError(f"{self.path}: not a usable evaluation cache ({err})") from None
        if found != str(SCHEMA_VERSION):
            raise VlsafeError(f"{self.path}: cache schema {found}, this vlsafe writes {SCHEMA_VERSION} "
                              "(use a new --cache path)")
        self.hits = self.misses = 0

    def _open(self, timeout_s: float) -> sqlite3.Connection:
        """Connect, switch to WAL and create the schema, retrying while another process does the same.

        Switching a fresh file to WAL can fail with "database is locked" at once, without waiting on the busy
        timeout, when two processes open a new cache together; so the whole set-up is retried until timeout_s.
        """
        deadline, attempt = time.monotonic() + timeout_s, 0
        while True:
            db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            try:
                db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR IGNORE INTO meta VALUES "
                                 f"('schema', '{SCHEMA_VERSION}'); COMMIT;")
                return db
            except sqlite3.OperationalError as err:
                db.close()
                busy = getattr(err, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY  # incl. extended codes
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(min(0.5, 0.01 * 2 ** attempt) * random.random())
                attempt += 1
            except BaseException:
                db.close()
                raise

    # ------------------------------------------------------------------------------------------ generations
    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite caps the number of bound parameters
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, response FROM generations WHERE key IN ({marks})", chunk))
        self.hits += sum(k in found for k in keys)
        self.misses += sum(k not in found for k in keys)
        return found

    def put_many(self, rows: list[dict]) -> None:
        """rows: dicts with key, model, prompt, system, image_sha256, decoding, backend, response."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(r["key"], r["model"], r["prompt"], r["system"], r["image_sha256"], r["decoding"], r["backend"],
                  r["response"], now) for r in rows])

    # ------------------------------------------------------------------------------------------ judgements
    def get_verdicts(self, generation_keys: list[str], judge: str, version: str) -> dict[str, dict]:
        found = {}
        unique = list(dict.fromkeys(generation_keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT generation, verdict FROM judgements WHERE judge = ? AND version = ? "
                                    f"AND generation IN ({marks})", [judge, version, *chunk])
            found.update({key: json.loads(verdict) for key, verdict in rows})
        return found

    def put_verdicts(self, verdicts: dict[str, dict], judge: str, version: str) -> None:
        now = time.time()
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?)",
                                 [(key, judge, version, json.dumps(v), now) for key, v in verdicts.items()])

    def counts(self) -> dict:
        return {table: self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("generations", "judgements")}

    def close(self) -> None:
        self._db.close()

    def _transaction(self):
        db = self._db

        class _Tx:  # BEGIN IMMEDIATE takes the write lock up front, so a busy writer waits rather than deadlocks
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, *_):
                db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()
