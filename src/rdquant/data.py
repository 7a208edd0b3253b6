"""Calibration windows (GPTQ-style random windows, fixed seed) and evaluation text."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import torch

from .errors import RdquantError

ASSETS = Path(__file__).parent / "assets"
BUNDLED_CALIB = ASSETS / "c4_sample.jsonl.gz"


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_documents(path: str | os.PathLike | None) -> list[str]:
    """Documents of a JSONL file (field `text`) or a plain-text file (one document); None = bundled C4."""
    p = BUNDLED_CALIB if path is None else Path(path).expanduser()
    if not p.is_file():
        raise RdquantError(f"calibration file not found: {p}")
    try:
        return _read_documents(p)
    except UnicodeDecodeError as e:
        raise RdquantError(f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. with iconv -t UTF-8") from e
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise RdquantError(f"cannot read {p}: {e}") from e


def _read_documents(p: Path) -> list[str]:
    is_jsonl = ".jsonl" in p.suffixes or ".json" in p.suffixes
    with _open_text(p) as f:
        if not is_jsonl:
            docs = [f.read()]
        else:
            docs = []
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise RdquantError(f"{p}:{i}: expected a JSON object with a 'text' field ({e})") from e
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise RdquantError(f"calibration file {p} has no text")
    return docs


def bos_id(tokenizer) -> int | None:
    """The BOS token id when the tokenizer puts one before every text (some model families depend on
    it), else None: read from what it does, not from a flag."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and len(full) > len(plain) and full[0] == bos and plain[:1] != [bos] else None


def calibration_windows(
    tokenizer, path: str | os.PathLike | None, n_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """[n_samples, seqlen] token windows: a random document longer than seqlen, then a random start
    in it (as GPTQ samples C4). If no document is long enough, windows come from all documents
    joined with the EOS token. A tokenizer that adds a BOS token gets it at the start of every window
    (then seqlen - 1 text tokens)."""
    docs = read_documents(path)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    long_docs = [t for t in ids if len(t) > seqlen]
    if not long_docs:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        joined = [tok for t in ids for tok in t + eos]
        if len(joined) <= seqlen:
            where = "the bundled sample" if path is None else str(path)
            raise RdquantError(
                f"calibration text in {where} has {len(joined)} tokens, fewer than one window of "
                f"{seqlen + 1}; use a longer file or a smaller --calib-seqlen"
            )
        long_docs = [joined]
    rng = random.Random(seed)
    bos = bos_id(tokenizer)
    head, body = ([bos], seqlen - 1) if bos is not None else ([], seqlen)
    windows = []
    for _ in range(n_samples):
        t = long_docs[rng.randrange(len(long_docs))]
        start = rng.randrange(len(t) - seqlen)
        windows.append(head + t[start : start + body])
    return torch.tensor(windows, dtype=torch.long)


def eval_windows(tokenizer, text: str, seqlen: int) -> torch.Tensor:
    """[n, seqlen] consecutive evaluation windows of `text` (every whole one). With a tokenizer that
    adds a BOS token, each window is BOS and the next seqlen - 1 text tokens."""
    bos = bos_id(tokenizer)
    if bos is None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        n = ids.numel() // seqlen
        return ids[: n * seqlen].reshape(n, seqlen)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // (seqlen - 1)
    body = ids[: n * (seqlen - 1)].reshape(n, seqlen - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=body.dtype), body], 1)


def shared_data_dir() -> Path | None:
    """The project's shared data folder: $RDQUANT_DATA, else ../shared/data beside the checkout/cwd."""
    env = os.environ.get("RDQUANT_DATA")
    candidates = [Path(env)] if env else []
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[3]):
        candidates.append(base / ".." / "shared" / "data")
        candidates.append(base / "shared" / "data")
    for c in candidates:
        if (c / "wikitext2").is_dir() or (c / "c4").is_dir():
            return c.resolve()
    return None


def eval_text(data: str) -> str:
    """The evaluation text: `wikitext2` (test split, rows joined as in the GPTQ/AWQ papers) or a path."""
    if data == "wikitext2":
        base = shared_data_dir()
        path = base / "wikitext2" / "wiki.test.raw" if base else None
        if path is None or not path.is_file():
            raise RdquantError(
                "WikiText-2 test file not found: set RDQUANT_DATA to a folder holding wikitext2/wiki.test.raw"
            )
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RdquantError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
        rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
        return "\n\n".join(rows)
    p = Path(data).expanduser()
    if not p.is_file():
        raise RdquantError(f"evaluation data not found: {data} (use 'wikitext2' or a text/JSONL file)")
    docs = read_documents(p)
    return "\n\n".join(docs)


def context_length(config) -> int | None:
    """The longest sequence a model (or its config) accepts: max_position_embeddings or its kin."""
    config = getattr(config, "config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context (they would run on positions it never saw)."""
    if seqlen < 2:
        raise RdquantError(f"{flag} must be at least 2 tokens (got {seqlen})")
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise RdquantError(f"{flag} {seqlen} is longer than the model's context of {limit} tokens; use at most {limit}")
