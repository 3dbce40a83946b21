#!/usr/bin/env bash
# Prepare enwik8 for the Transformer-LS recipes: 90M / 5M / 5M byte split, JSONL, then Megatron .bin/.idx.
#
# Usage: bash examples/enwik8/prepare_enwik8.sh /path/to/enwik8[.zip] [OUTPUT_DIR=data/enwik8]
#
# This script never downloads anything: fetch enwik8 (the first 10^8 bytes of the English Wikipedia XML dump,
# Hutter Prize; distributed as enwik8.zip) yourself and pass its path. Writes
#   OUTPUT_DIR/enwik8_{train,valid,test}.jsonl   the three parts, ~1 MB documents, in order
#   OUTPUT_DIR/enwik8.jsonl                      the three parts concatenated (train, valid, test)
#   OUTPUT_DIR/enwik8_text_document.{bin,idx}    ByteTokenizer tokens: use --data-path OUTPUT_DIR/enwik8_text_document
# and prints the matching --split (90,5,5: 90 train, 5 valid, 5 test documents).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
INPUT="${1:?usage: $0 /path/to/enwik8[.zip] [output dir]}"
OUTPUT_DIR="${2:-data/enwik8}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-python}"

"${PYTHON}" "${REPO_ROOT}/examples/common/split_char_corpus.py" \
  --input "${INPUT}" --output-dir "${OUTPUT_DIR}" --name enwik8 \
  --train-bytes 90000000 --valid-bytes 5000000 --test-bytes 5000000 --document-bytes 1000000

# No --append-eod: the documents are consecutive pieces of one byte stream, and must concatenate back to it.
"${PYTHON}" "${REPO_ROOT}/tools/preprocess_data.py" \
  --input "${OUTPUT_DIR}/enwik8.jsonl" --json-keys text \
  --tokenizer-type ByteTokenizer \
  --output-prefix "${OUTPUT_DIR}/enwik8" --workers "${WORKERS}"

SPLIT="$("${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["split"])' \
  "${OUTPUT_DIR}/enwik8_split.json")"
echo "data prefix: ${OUTPUT_DIR}/enwik8_text_document   (train/evaluate with --split ${SPLIT})"
