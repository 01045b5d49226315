#!/usr/bin/env python3
"""Download the official cached FineWeb export (token shards + tokenizer) from Hugging Face.

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10

Fetches, from the dataset repo willdepueoai/parameter-golf (env MATCHED_FINEWEB_REPO_ID overrides it; the export
lives under its folder datasets/, env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX overrides that), as its manifest.json lists:
  data/manifest.json
  data/tokenizers/<the variant's tokenizer files>          e.g. fineweb_1024_bpe.model
  data/datasets/fineweb10B_<variant>/fineweb_val_*.bin     always all of them
  data/datasets/fineweb10B_<variant>/fineweb_train_*.bin   the first --train-shards (default 80)
and writes data/datasets/fineweb10B_<variant>/manifest.json in data/build_shards.py's format (each shard's token count
and sha256, the tokenizer's sha256), which train_gpt.py checks. Files already present and valid (and, for shards, of
the sha256 recorded there) are kept; every shard's header is checked after download.

    python data/cached_challenge_fineweb.py --caseops --vocab-size 8192 --train-shards 10

instead fetches the documents the export was tokenized from (data/docs_selected.jsonl, ~48 GB, and its
docs_selected.source_manifest.json, which says how many of the first ones are the validation set) and builds caseops
shards from them with data/build_shards.py --caseops into data/datasets/fineweb10B_sp<V>_caseops/ (its manifest.json
also lists the validation byte sidecars). See data/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import DataError, read_shard_header  # noqa: E402  (the training script's own strict reader)

import build_shards  # noqa: E402  (run as a file, its folder is on sys.path)

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
MANIFEST = "manifest.json"
# Downloads land here first and move into place only once checked, so a destination file is always complete.
# Inside data/datasets/ (ignored by git, same filesystem as the destinations, so the move is a rename).
STAGING = Path("datasets") / ".download"
DOCS = "docs_selected.jsonl"  # the export's documents, in order: the first docs_val are the validation set
DOCS_FACTS = "docs_selected.source_manifest.json"
DEFAULT_CASEOPS_VOCAB = 8192
VARIANT_RE = re.compile(r"^(sp|byte)\d+$")
OFFLINE_HINT = ("Without network access, build shards from your own documents instead: python data/build_shards.py "
                "--input docs.jsonl --output-dir data/datasets/mydocs --vocab-size 1024 --val-docs 1000 "
                "(see data/README.md)")

# Exception class names (anywhere in the MRO) that mean "could not talk to the Hub". Matched by name so that
# huggingface_hub 0.x (requests) and 1.x/2.x (httpx) are both covered without importing their internals.
NETWORK_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError", "ConnectError",
                  "TimeoutError", "Timeout", "TimeoutException", "TransportError", "HTTPError", "RequestException"}


class DownloadError(DataError):
    """The export could not be fetched or is not what the manifest describes; the message says what to do."""


@dataclass(frozen=True)
class Wanted:
    """One file to have locally: where it lives in the repo, where it goes, and what makes it valid."""

    remote: str  # path inside the Hugging Face repo, e.g. datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    local: Path
    kind: str  # "shard", "tokenizer" or "docs"
    expected_tokens: int | None = None  # shards: exact count when the manifest's stats pin it down
    vocab_size: int | None = None  # tokenizer models: piece count the manifest promises
    expected_bytes: int | None = None  # the documents: size the docs manifest promises


# -----------------------------------------------------------------------------
# The one real network call (tests substitute a function with the same signature)


def hub_download(repo_id: str, remote_path: str, staging_dir: Path) -> Path:
    """Fetch one file of the dataset repo into staging_dir/remote_path and return its path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its per-retry warnings would bury the one message this script prints
    return Path(hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset", local_dir=staging_dir))


Download = Callable[[str, str, Path], Path]


def error_kind(exc: BaseException) -> str:
    """'network', 'repo' (repo missing or not accessible), 'missing' (file not in repo) or 'other'."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "LocalEntryNotFoundError" in names:  # offline lookups; it subclasses EntryNotFoundError, so test it first
        return "network"
    if names & {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"}:
        return "repo"
    if "EntryNotFoundError" in names:
        return "missing"
    if names & NETWORK_ERRORS:
        return "network"
    return "other"


def describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def fetch_to_staging(download: Download, repo_id: str, remote: str, data_dir: Path) -> Path:
    """Call the download function, turning its failures into one DownloadError that says what to do."""
    try:
        return Path(download(repo_id, remote, data_dir / STAGING))
    except Exception as exc:
        kind = error_kind(exc)
        if kind == "network":
            raise DownloadError(f"cannot download {remote} from the Hugging Face dataset repo {repo_id} "
                                f"({describe(exc)}). Check the network (and HF_TOKEN / HF_ENDPOINT if you use them) "
                                f"and run the command again; files already downloaded are kept. "
                                f"{OFFLINE_HINT}") from exc
        if kind == "repo":
            raise DownloadError(f"the Hugging Face dataset repo {repo_id} does not exist or is not accessible "
                                f"({describe(exc)}); set MATCHED_FINEWEB_REPO_ID to a repo holding the export "
                                f"(default {DEFAULT_REPO_ID}). {OFFLINE_HINT}") from exc
        if kind == "missing":
            raise DownloadError(f"{remote} is not in the Hugging Face dataset repo {repo_id} ({describe(exc)}); "
                                f"check MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX") from exc
        if isinstance(exc, OSError):  # a local problem: disk full, permissions
            raise DownloadError(f"downloading {remote} into {data_dir / STAGING} failed: {describe(exc)}") from exc
        raise


# -----------------------------------------------------------------------------
# The manifest


def dataset_name(variant: str) -> str:
    if not VARIANT_RE.match(variant):
        raise DownloadError(f"unknown variant {variant!r}: expected sp<vocab size> such as sp1024, sp4096 or sp8192")
    return f"fineweb10B_{variant}"


def safe_relative(value: object, what: str) -> PurePosixPath:
    """A manifest path as a relative path that cannot leave the export root (the manifest comes from the net)."""
    path = PurePosixPath(str(value))
    if not str(value) or path.is_absolute() or ".." in path.parts:
        raise DownloadError(f"the manifest's {what} {value!r} is not a relative path inside the export")
    return path


def select_variant(manifest: dict, variant: str) -> tuple[dict, dict]:
    """The manifest's dataset entry for the variant and its tokenizer entry."""
    name = dataset_name(variant)
    datasets = [d for d in manifest.get("datasets", []) if isinstance(d, dict)]
    dataset = next((d for d in datasets if d.get("name") == name), None)
    if dataset is None:
        offered = sorted(str(d.get("name", "?")).removeprefix("fineweb10B_") for d in datasets)
        raise DownloadError(f"variant {variant} ({name}) is not in the export's manifest; it offers: "
                            f"{', '.join(offered) or 'nothing'}")
    tokenizer_name = dataset.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict)
                      and t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DownloadError(f"the manifest's dataset {name} names tokenizer {tokenizer_name!r}, which its "
                            f"tokenizers list lacks")
    return dataset, tokenizer


def split_file_count(dataset: dict, split: str) -> int:
    value = (dataset.get("stats") or {}).get(f"files_{split}")
    if not isinstance(value, int) or value < 0:
        raise DownloadError(f"the manifest's dataset {dataset.get('name')} has no stats.files_{split} shard count")
    return value


def expected_shard_tokens(manifest: dict, dataset: dict, split: str) -> list[int] | None:
    """Exact token count of each shard of a split, when the manifest pins it down.

    The export cuts each split's stream into shards of exactly shard_size tokens, the last one shorter, so
    stats.tokens_<split> and stats.files_<split> fix every shard's size. Used only when the numbers are
    consistent with that layout; otherwise only the header check applies.
    """
    stats = dataset.get("stats") or {}
    size, files, tokens = manifest.get("shard_size"), stats.get(f"files_{split}"), stats.get(f"tokens_{split}")
    if not all(isinstance(v, int) for v in (size, files, tokens)) or size <= 0 or files <= 0:
        return None
    last = tokens - size * (files - 1)
    if not 0 < last <= size:
        return None
    return [size] * (files - 1) + [last]


def plan(manifest: dict, variant: str, train_shards: int, remote_root: str, data_dir: Path) -> list[Wanted]:
    """Every file to have locally for this variant: tokenizer files, all val shards, the first train shards."""
    dataset, tokenizer = select_variant(manifest, variant)
    name = dataset["name"]
    available = split_file_count(dataset, "train")
    if train_shards > available:
        raise DownloadError(f"--train-shards {train_shards}: variant {variant} has only {available} train shards "
                            f"in the export's manifest; pass --train-shards {available} or fewer (or "
                            f"--refresh-manifest if the export has grown)")
    root = PurePosixPath(remote_root) if remote_root else PurePosixPath()
    vocab = tokenizer.get("vocab_size", dataset.get("vocab_size"))
    wanted = []
    for key in ("model_path", "vocab_path", "path"):  # the keys the export uses for tokenizer artifacts
        if tokenizer.get(key):
            rel = safe_relative(tokenizer[key], f"tokenizer {key}")
            wanted.append(Wanted(str(root / rel), data_dir.joinpath(*rel.parts), "tokenizer",
                                 vocab_size=vocab if key == "model_path" and isinstance(vocab, int) else None))
    if not any(w.kind == "tokenizer" for w in wanted):
        raise DownloadError(f"the manifest's tokenizer {tokenizer.get('name')!r} lists no file to download")
    shard_dir = PurePosixPath("datasets") / name
    for split, count in (("val", split_file_count(dataset, "val")), ("train", train_shards)):
        sizes = expected_shard_tokens(manifest, dataset, split)
        for i in range(count):
            rel = shard_dir / f"fineweb_{split}_{i:06d}.bin"
            wanted.append(Wanted(str(root / rel), data_dir.joinpath(*rel.parts), "shard",
                                 expected_tokens=sizes[i] if sizes else None))
    return wanted


def load_manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("datasets"), list) else None


def get_manifest(download: Download, repo_id: str, remote_root: str, data_dir: Path, variant: str,
                 refresh: bool, log: Callable[[str], None]) -> dict:
    """The local manifest if it knows the variant (so a complete download works offline), else a fresh one."""
    local = data_dir / MANIFEST
    manifest = None if refresh else load_manifest(local)
    if manifest is not None and any(d.get("name") == dataset_name(variant) for d in manifest["datasets"]
                                    if isinstance(d, dict)):
        return manifest
    remote = str(PurePosixPath(remote_root) / MANIFEST) if remote_root else MANIFEST
    log(f"fetching {remote} from {repo_id} ...")
    staged = fetch_to_staging(download, repo_id, remote, data_dir)
    manifest = load_manifest(staged)
    if manifest is None:
        staged.unlink(missing_ok=True)
        raise DownloadError(f"{remote} from {repo_id} is not a JSON manifest with a datasets list; check "
                            f"MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX")
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staged, local)
    return manifest


# -----------------------------------------------------------------------------
# Checking files


def problem(w: Wanted, path: Path | None = None) -> str | None:
    """Why the file at path (default: its destination) is not the one wanted, or None when it is valid."""
    path = path or w.local
    if not path.is_file():
        return "missing"
    if w.kind == "shard":
        try:
            n = read_shard_header(path)
        except DataError as exc:
            return str(exc)
        if w.expected_tokens is not None and n != w.expected_tokens:
            return f"{path}: {n} tokens, but the manifest implies {w.expected_tokens}"
        return None
    if path.stat().st_size == 0:
        return f"{path}: empty file"
    if w.expected_bytes is not None and path.stat().st_size != w.expected_bytes:
        return f"{path}: {path.stat().st_size} bytes, but {DOCS_FACTS} says {w.expected_bytes} (incomplete?)"
    if w.vocab_size is not None and path.suffix == ".model":
        import sentencepiece as spm

        try:
            pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        except Exception as exc:  # sentencepiece raises assorted types for unreadable models
            return f"{path}: not a readable sentencepiece model ({describe(exc)})"
        if pieces != w.vocab_size:
            return f"{path}: {pieces} pieces, but the manifest says vocab_size {w.vocab_size}"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{path}: not valid JSON ({describe(exc)})"
    return None


def fetch(w: Wanted, download: Download, repo_id: str, data_dir: Path) -> None:
    """Download one file, check it, and only then move it to its destination."""
    staged = fetch_to_staging(download, repo_id, w.remote, data_dir)
    reason = problem(w, staged)
    if reason is not None:
        staged.unlink(missing_ok=True)  # never keep a corrupt file where the next run would find it
        raise DownloadError(f"downloaded {w.remote} from {repo_id}, but it is corrupt: {reason}. Run the command "
                            f"again to retry; if it persists, the repo's copy is damaged")
    w.local.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staged, w.local)


def resolve_hub(download: Download | None, repo_id: str | None, remote_root: str | None,
                data_dir: Path | None) -> tuple[Download, str, str, Path]:
    """The download function, repo, export root and local data folder: arguments, else environment, else defaults."""
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO_ID
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    return (download or hub_download, repo_id, remote_root.strip("/"),
            Path(data_dir) if data_dir is not None else DATA_DIR)


def ensure_files(wanted: list[Wanted], download: Download, repo_id: str, data_dir: Path, log: Callable[[str], None],
                 recorded: dict[str, str] | None = None, before_fetch: Callable[[], None] | None = None
                 ) -> tuple[dict, dict[str, str]]:
    """Keep each wanted file that is present and valid (a shard also of the sha256 `recorded` for it, if any), fetch
    the others, before_fetch() once before the first; returns what was done and each shard's sha256 by name."""
    done, hashes, recorded = {"downloaded": 0, "replaced": 0, "kept": 0}, {}, recorded or {}
    width = len(str(len(wanted)))
    for i, w in enumerate(wanted, 1):
        reason = problem(w)
        if reason is None and w.kind == "shard":
            sha = hashes[w.local.name] = build_shards.sha256_file(w.local)
            if recorded.get(w.local.name, sha) != sha:
                reason = f"sha256 {sha[:12]}..., not the {recorded[w.local.name][:12]}... recorded at its download"
        where = w.local.relative_to(data_dir) if w.local.is_relative_to(data_dir) else w.local
        if reason is None:
            done["kept"] += 1
            log(f"[{i:>{width}}/{len(wanted)}] {where}: present and valid, kept")
            continue
        if not done["downloaded"] + done["replaced"] and before_fetch is not None:
            before_fetch()
        if reason != "missing":
            log(f"[{i:>{width}}/{len(wanted)}] {where}: invalid ({reason}); downloading it again")
            w.local.unlink()
            done["replaced"] += 1
        else:
            done["downloaded"] += 1
            log(f"[{i:>{width}}/{len(wanted)}] {where}: downloading")
        fetch(w, download, repo_id, data_dir)
        if w.kind == "shard":
            hashes[w.local.name] = build_shards.sha256_file(w.local)
    return done, hashes


def download_variant(variant: str = "sp1024", train_shards: int = DEFAULT_TRAIN_SHARDS, *,
                     data_dir: Path | None = None, repo_id: str | None = None, remote_root: str | None = None,
                     download: Download | None = None, refresh_manifest: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """Make data_dir hold a valid copy of the variant's tokenizer, val shards and first train_shards train shards.

    data_dir defaults to this script's folder (data/) and download to hub_download, both looked up at call time;
    returns counts of what was done and the paths.
    """
    download, repo_id, remote_root, data_dir = resolve_hub(download, repo_id, remote_root, data_dir)
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    dataset_name(variant)  # reject a malformed variant before touching the network

    manifest = get_manifest(download, repo_id, remote_root, data_dir, variant, refresh_manifest, log)
    wanted = plan(manifest, variant, train_shards, remote_root, data_dir)
    dataset, tokenizer = select_variant(manifest, variant)
    shard_dir = data_dir / "datasets" / dataset["name"]
    model = next((w.local for w in wanted if w.kind == "tokenizer" and w.local.suffix == ".model"), None)
    # until the manifest below is written, a run refuses the folder (train_gpt.py)
    done, hashes = ensure_files(wanted, download, repo_id, data_dir, log, recorded_hashes(shard_dir),
                                (lambda: mark_incomplete(shard_dir)) if model is not None else None)

    if model is not None:
        source = {"repo_id": repo_id, "remote_root": remote_root, "dataset": dataset["name"]}
        build_shards.write_manifest(shard_dir, shard_manifest(shard_dir, model, hashes, tokenizer,
                                                              manifest.get("shard_size"), source))
    log(f"done: {done['downloaded']} downloaded, {done['replaced']} replaced, {done['kept']} kept; "
        f"{train_shards} train + {split_file_count(dataset, 'val')} val shards in {shard_dir}"
        + (f", each one's token count and sha256 in {shard_dir / MANIFEST}" if model is not None else ""))
    if model is not None:
        log(f"train with: DATA_PATH={shard_dir} TOKENIZER_PATH={model} "
            f"VOCAB_SIZE={tokenizer.get('vocab_size', dataset.get('vocab_size', '?'))}")
    return {**done, "dataset_dir": shard_dir, "files": [w.local for w in wanted]}


def build_caseops(vocab_size: int = DEFAULT_CASEOPS_VOCAB, train_shards: int = DEFAULT_TRAIN_SHARDS, *,
                  data_dir: Path | None = None, repo_id: str | None = None, remote_root: str | None = None,
                  download: Download | None = None, workers: int = 1, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Fetch the export's documents (data/docs_selected.jsonl and its facts) and build caseops shards from them
    with data/build_shards.py: its first docs_val documents are the validation set, as in the export, and a
    vocab_size tokenizer is trained on the documents after them. Returns build_shards's manifest."""
    download, repo_id, remote_root, data_dir = resolve_hub(download, repo_id, remote_root, data_dir)
    if train_shards < 0:
        raise DownloadError(f"--train-shards must be >= 0, got {train_shards}")
    root = PurePosixPath(remote_root) if remote_root else PurePosixPath()
    facts_file = Wanted(str(root / DOCS_FACTS), data_dir / DOCS_FACTS, "docs")
    ensure_files([facts_file], download, repo_id, data_dir, log)
    facts = json.loads(facts_file.local.read_text(encoding="utf-8"))
    val_docs = facts.get("docs_val", facts.get("num_val_docs")) if isinstance(facts, dict) else None
    if not isinstance(val_docs, int) or val_docs < 1:
        raise DownloadError(f"{facts_file.local} names no validation document count (docs_val); "
                            f"check MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX")
    size = facts.get("docs_bytes")
    docs = Wanted(str(root / DOCS), data_dir / DOCS, "docs", expected_bytes=size if isinstance(size, int) else None)
    ensure_files([docs], download, repo_id, data_dir, log)
    out = data_dir / "datasets" / f"fineweb10B_sp{vocab_size}_caseops"
    return build_shards.build_shards([docs.local], out, val_docs=val_docs, vocab_size=vocab_size, workers=workers,
                                     train_shards=train_shards, case_ops=True, overwrite=overwrite, log=log)


# -----------------------------------------------------------------------------
# The shards' own manifest.json, in the format data/build_shards.py writes, so train_gpt.py checks both alike


def recorded_hashes(shard_dir: Path) -> dict[str, str]:
    """{shard name: sha256} as the folder's manifest.json recorded them at download, {} without one."""
    try:
        listed = json.loads((shard_dir / MANIFEST).read_text(encoding="utf-8"))["splits"]
        return {f["name"]: f["sha256"] for split in listed.values() for f in split["files"] if "sha256" in f}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def mark_incomplete(shard_dir: Path) -> None:
    """Keep what the manifest recorded, marked incomplete: an interrupted download then leaves a folder that
    train_gpt.py refuses, and the next run still compares the files it keeps with their recorded sha256."""
    try:
        kept = json.loads((shard_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        kept = {}
    shard_dir.mkdir(parents=True, exist_ok=True)
    build_shards.write_manifest(shard_dir, {**(kept if isinstance(kept, dict) else {}), "complete": False})


def shard_manifest(shard_dir: Path, model: Path, hashes: dict[str, str], tokenizer: dict, shard_size, source: dict
                   ) -> dict:
    """Every shard in the folder (those of an earlier, larger download too): its token count and sha256."""
    splits = {split: build_shards.split_entry(shard_dir, split, hashes) for split in ("val", "train")}
    return {
        "format": build_shards.SHARD_FORMAT,
        "source": source,
        "tokenizer": {"file": os.path.relpath(model, shard_dir), "sha256": build_shards.sha256_file(model),
                      "vocab_size": tokenizer.get("vocab_size")},
        "bos_id": build_shards.BOS_ID,
        "append_eos": False,
        "shard_tokens": shard_size,
        "tokens_total": splits["val"]["tokens"] + splits["train"]["tokens"],
        "splits": splits,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download the challenge's cached FineWeb shards and tokenizer from "
                                            "Hugging Face (see data/README.md).")
    p.add_argument("--variant", default="sp1024", help="tokenizer family: sp1024, sp4096, sp8192, as the "
                                                       "export's manifest offers (default %(default)s)")
    p.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                   help="how many train shards to fetch, the first N (100M tokens each); val is always fetched "
                        "whole (default %(default)s)")
    p.add_argument("--refresh-manifest", action="store_true",
                   help="download manifest.json again even if data/manifest.json already lists the variant")
    caseops = p.add_argument_group("caseops shards, built here from the export's documents (data/caseops.py)")
    caseops.add_argument("--caseops", action="store_true",
                         help="fetch data/docs_selected.jsonl and build caseops shards from it instead of "
                              "downloading a variant's shards")
    caseops.add_argument("--vocab-size", type=int, default=DEFAULT_CASEOPS_VOCAB,
                         help="with --caseops: pieces of the tokenizer trained on the train documents "
                              "(default %(default)s)")
    caseops.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                         help="with --caseops: encoding processes (default %(default)s)")
    caseops.add_argument("--overwrite", action="store_true", help="with --caseops: replace an earlier build")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.caseops:
            build_caseops(args.vocab_size, args.train_shards, workers=args.workers, overwrite=args.overwrite)
        else:
            download_variant(args.variant, args.train_shards, refresh_manifest=args.refresh_manifest)
    except (DataError, build_shards.BuildError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cached_challenge_fineweb.py: interrupted (Ctrl-C); every file in place is complete, an unfinished "
              "download is marked so in the shards' manifest.json and an unfinished --caseops build left nothing: "
              "run the same command again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
