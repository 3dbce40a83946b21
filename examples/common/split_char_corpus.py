#!/usr/bin/env python
"""Split a character-level LM corpus (enwik8, text8) into train/valid/test JSONL documents, as in the paper.

The standard split of both corpora (Transformer-XL's ``prep_enwik8.py``, used by Transformer-LS) is by BYTES:
the first 90M bytes train, the next 5M valid, the last 5M test. Each part is cut into documents of about
``--document-bytes`` (1M by default, so 90 + 5 + 5 documents) and written, in order, as JSONL lines
``{"text": ...}``: ``{name}_train.jsonl``, ``{name}_valid.jsonl``, ``{name}_test.jsonl``, and all three
concatenated into ``{name}.jsonl``. Preprocessing ``{name}.jsonl`` with the ByteTokenizer (no ``--append-eod``)
gives back the byte stream unchanged, and training / evaluating with ``--split 90,5,5`` selects exactly the
paper's parts (the split is by documents; this script prints the split string that matches its output).

Every cut (between documents, and the 90M / 95M cuts between parts) is made at a UTF-8 character boundary:
a cut that falls inside a multi-byte character moves back to that character's first byte (at most 3 bytes),
so no character is broken and the printed part sizes may differ from 90M/5M/5M by those few bytes. Bytes that
are still not valid UTF-8 (a file that is damaged, or ends inside a character) are replaced by U+FFFD and
COUNTED in the summary, since the JSONL text must be valid Unicode.

This script reads a file the user already has (plain or the original ``.zip``); it never downloads anything.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Optional, Sequence

PARTS = ("train", "valid", "test")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the corpus file (e.g. enwik8 or enwik8.zip, text8 or text8.zip)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--name", required=True, help="output file stem, e.g. enwik8")
    p.add_argument("--train-bytes", type=int, default=90_000_000)
    p.add_argument("--valid-bytes", type=int, default=5_000_000)
    p.add_argument("--test-bytes", type=int, default=5_000_000)
    p.add_argument("--document-bytes", type=int, default=1_000_000, help="target document size")
    p.add_argument("--allow-short", action="store_true",
                   help="accept an input shorter than train+valid+test (the test part takes what is left)")
    return p.parse_args(argv)


def read_corpus(path: str) -> bytes:
    """The raw bytes of ``path``; a ``.zip`` with a single member (as distributed) is read transparently."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file (download the corpus yourself first)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.namelist() if not m.endswith("/")]
            if len(members) != 1:
                raise ValueError(f"--input {path}: expected one file in the zip archive, found {members}")
            return archive.read(members[0])
    with open(path, "rb") as fh:
        return fh.read()


def _char_boundary(data: bytes, pos: int, lower: int) -> int:
    """Largest position <= ``pos`` (and > ``lower``) that does not split a UTF-8 sequence."""
    cut = pos
    while cut > lower + 1 and cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def split_documents(part: bytes, document_bytes: int) -> list[bytes]:
    """Cut ``part`` into ``round(len / document_bytes)`` (at least 1) consecutive chunks at character boundaries.

    Rounding (not ceiling) keeps a part that a boundary shift made a few bytes longer at the same document count.
    """
    count = max(1, (len(part) + document_bytes // 2) // document_bytes)
    cuts = [0]
    for k in range(1, count):
        cuts.append(_char_boundary(part, k * document_bytes, cuts[-1]))
    cuts.append(len(part))
    return [part[a:b] for a, b in zip(cuts, cuts[1:])]


def decode(chunk: bytes) -> tuple[str, int]:
    """UTF-8 text of ``chunk`` and the number of U+FFFD replacements needed (0 for valid UTF-8)."""
    try:
        return chunk.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = chunk.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - chunk.decode("utf-8", errors="ignore").count("\ufffd")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Split, write the JSONL files, print a summary with the ``--split`` string to use; returns the summary."""
    args = parse_args(argv)
    data = read_corpus(args.input)
    sizes = [args.train_bytes, args.valid_bytes, args.test_bytes]
    if len(data) < sum(sizes):
        if not args.allow_short:
            raise ValueError(f"--input {args.input}: {len(data)} bytes, expected at least {sum(sizes)} "
                             f"(train {sizes[0]} + valid {sizes[1]} + test {sizes[2]}); pass --allow-short "
                             f"for a smaller file")
        sizes[2] = max(0, len(data) - sizes[0] - sizes[1])
    if len(data) > sum(sizes):
        print(f" note: ignoring the last {len(data) - sum(sizes)} bytes of {args.input}", file=sys.stderr)
    os.makedirs(args.output_dir, exist_ok=True)
    summary: dict = {"input": args.input, "input_bytes": len(data), "parts": {}}
    # Part cuts at the paper's byte offsets, moved back (by at most 3 bytes) to the start of the character there,
    # so that no character is split between two parts.
    bounds = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    for i in (1, 2):
        bounds[i] = _char_boundary(data, bounds[i], bounds[i - 1])
    summary["part_offsets"] = bounds
    combined_path = os.path.join(args.output_dir, f"{args.name}.jsonl")
    with open(combined_path + ".tmp", "w", encoding="utf-8") as combined:
        for index, part_name in enumerate(PARTS):
            part = data[bounds[index]:bounds[index + 1]]
            docs = split_documents(part, args.document_bytes)
            replaced = 0
            part_path = os.path.join(args.output_dir, f"{args.name}_{part_name}.jsonl")
            with open(part_path + ".tmp", "w", encoding="utf-8") as out:
                for doc in docs:
                    text, bad = decode(doc)
                    replaced += bad
                    line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                    out.write(line)
                    combined.write(line)
            os.replace(part_path + ".tmp", part_path)
            summary["parts"][part_name] = {"bytes": len(part), "documents": len(docs),
                                           "replaced_invalid_utf8": replaced, "jsonl": part_path}
    os.replace(combined_path + ".tmp", combined_path)
    counts = [summary["parts"][p]["documents"] for p in PARTS]
    summary["split"] = ",".join(str(c) for c in counts)
    summary["jsonl"] = combined_path
    for part_name in PARTS:
        info = summary["parts"][part_name]
        print(f" {part_name:5}: {info['bytes']:>11} bytes in {info['documents']:>4} documents"
              f" ({info['replaced_invalid_utf8']} invalid UTF-8 sequences replaced) -> {info['jsonl']}")
    print(f" all parts, in order: {combined_path}")
    print(f" train / evaluate with: --split {summary['split']}")
    with open(os.path.join(args.output_dir, f"{args.name}_split.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
