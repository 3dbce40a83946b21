#!/usr/bin/env bash
# Prepare text8 for the Transformer-LS recipe: 90M / 5M / 5M character split, JSONL, then Megatron .bin/.idx.
#
# Usage: bash examples/text8/prepare_text8.sh /path/to/text8[.zip] [OUTPUT_DIR=data/text8]
#
# This script never downloads anything: fetch text8 (10^8 characters of lower-case a-z and space, cleaned from
# enwik9; distributed as text8.zip) yourself and pass its path. Writes
#   OUTPUT_DIR/text8_{train,valid,test}.jsonl   the three parts, ~1 MB documents, in order
#   OUTPUT_DIR/text8.jsonl                      the three parts concatenated (train, valid, test)
#   OUTPUT_DIR/text8_text_document.{bin,idx}    ByteTokenizer tokens: use --data-path OUTPUT_DIR/text8_text_document
# and prints the matching --split (90,5,5). text8 is ASCII, so bytes = characters.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
INPUT="${1:?usage: $0 /path/to/text8[.zip] [output dir]}"
OUTPUT_DIR="${2:-data/text8}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-python}"

"${PYTHON}" "${REPO_ROOT}/examples/common/split_char_corpus.py" \
  --input "${INPUT}" --output-dir "${OUTPUT_DIR}" --name text8 \
  --train-bytes 90000000 --valid-bytes 5000000 --test-bytes 5000000 --document-bytes 1000000

# No --append-eod: the documents are consecutive pieces of one character stream.
"${PYTHON}" "${REPO_ROOT}/tools/preprocess_data.py" \
  --input "${OUTPUT_DIR}/text8.jsonl" --json-keys text \
  --tokenizer-type ByteTokenizer \
  --output-prefix "${OUTPUT_DIR}/text8" --workers "${WORKERS}"

SPLIT="$("${PYTHON}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["split"])' \
  "${OUTPUT_DIR}/text8_split.json")"
echo "data prefix: ${OUTPUT_DIR}/text8_text_document   (train/evaluate with --split ${SPLIT})"
