# shellcheck shell=bash
# Shared by the launch scripts in this directory: builds GPT_ARGS (the pretrain_gpt_ls.py flags) from the
# environment, so every launcher trains the same model. Any flag passed to a launch script on its command line
# is appended after GPT_ARGS and wins (argparse keeps the last value of a repeated flag).
#
# Environment (defaults in brackets):
#   DATA_PATH        dataset prefix from tools/preprocess_data.py [required]
#   SPLIT            [969,30,1]                 TOKENIZER_TYPE [ByteTokenizer]   (+ TOKENIZER_MODEL for SP)
#   NUM_LAYERS [12]  HIDDEN_SIZE [512]  NUM_HEADS [8]  SEQ_LENGTH [4096]
#   WINDOW_SIZE [512]  SEGMENT_LENGTH [16]  PROJECTION_RANK [1]
#   FULL_ATTENTION_LAYERS ["" = none]   e.g. "0 6" for a MASFormer-style mix of full and LS layers
#   MICRO_BATCH [1]  GLOBAL_BATCH [32]  TRAIN_ITERS [10000]  LR [2.5e-4]  WARMUP [500]
#   PRECISION [--bf16]   ("--fp16" on V100, "" for fp32)
#   TP [1]  PP [1]  ZERO [0]  ZERO_OFFLOAD [0]
#       ZERO=1|2|3 adds --zero-stage $ZERO and --deepspeed-config examples/ds_configs/zero${ZERO}_bf16.json
#       (ZERO=3 ZERO_OFFLOAD=1: zero3_offload_bf16.json); those JSONs enable bf16, so keep PRECISION=--bf16.
#   SAVE_DIR [checkpoints/gpt_ls]  (resumed from automatically when it holds a checkpoint)
#   SAVE_INTERVAL [1000]  EVAL_INTERVAL [1000]  EVAL_ITERS [10]  LOG_INTERVAL [10]  TENSORBOARD_DIR [$SAVE_DIR/tb]

LAUNCH_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PRETRAIN_SCRIPT="${LAUNCH_REPO_ROOT}/pretrain_gpt_ls.py"

build_gpt_args() {
  : "${DATA_PATH:?set DATA_PATH to a dataset prefix (see tools/preprocess_data.py or tools/prepare_sample_corpus.py)}"
  local save_dir="${SAVE_DIR:-checkpoints/gpt_ls}"
  GPT_ARGS=(
    --num-layers "${NUM_LAYERS:-12}" --hidden-size "${HIDDEN_SIZE:-512}" --num-attention-heads "${NUM_HEADS:-8}"
    --seq-length "${SEQ_LENGTH:-4096}" --max-position-embeddings "${MAX_POSITIONS:-${SEQ_LENGTH:-4096}}"
    --window-size "${WINDOW_SIZE:-512}" --segment-length "${SEGMENT_LENGTH:-16}"
    --projection-rank "${PROJECTION_RANK:-1}"
    --micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:-32}"
    --train-iters "${TRAIN_ITERS:-10000}" --lr "${LR:-2.5e-4}" --min-lr "${MIN_LR:-2.5e-5}"
    --lr-decay-style "${LR_DECAY_STYLE:-cosine}" --lr-warmup-iters "${WARMUP:-500}"
    --weight-decay "${WEIGHT_DECAY:-0.01}" --clip-grad "${CLIP_GRAD:-1.0}"
    --hidden-dropout "${DROPOUT:-0.1}" --attention-dropout "${DROPOUT:-0.1}"
    --data-path "${DATA_PATH}" --split "${SPLIT:-969,30,1}" --tokenizer-type "${TOKENIZER_TYPE:-ByteTokenizer}"
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
    --save "${save_dir}" --save-interval "${SAVE_INTERVAL:-1000}"
    --eval-interval "${EVAL_INTERVAL:-1000}" --eval-iters "${EVAL_ITERS:-10}" --log-interval "${LOG_INTERVAL:-10}"
    --tensorboard-dir "${TENSORBOARD_DIR:-${save_dir}/tb}"
  )
  if [[ -n "${TOKENIZER_MODEL:-}" ]]; then GPT_ARGS+=(--tokenizer-model "${TOKENIZER_MODEL}"); fi
  if [[ -n "${FULL_ATTENTION_LAYERS:-}" ]]; then
    # shellcheck disable=SC2206  # word splitting intended: a list of layer indices
    GPT_ARGS+=(--full-attention-layers ${FULL_ATTENTION_LAYERS})
  fi
  local precision="${PRECISION---bf16}"
  if [[ -n "${precision}" ]]; then GPT_ARGS+=("${precision}"); fi
  local zero="${ZERO:-0}"
  if [[ "${zero}" != 0 ]]; then
    local ds_config="${LAUNCH_REPO_ROOT}/examples/ds_configs/zero${zero}_bf16.json"
    if [[ "${ZERO_OFFLOAD:-0}" == 1 ]]; then
      ds_config="${LAUNCH_REPO_ROOT}/examples/ds_configs/zero${zero}_offload_bf16.json"
    fi
    if [[ ! -f "${ds_config}" ]]; then echo "no DeepSpeed config ${ds_config} for ZERO=${zero}" >&2; return 2; fi
    if [[ "${precision}" != "--bf16" ]]; then
      echo "the JSONs in examples/ds_configs enable bf16: use PRECISION=--bf16 with ZERO=${zero}" >&2; return 2
    fi
    # --zero-stage must match the JSON's stage: checkpoint tools read it from the saved arguments.
    GPT_ARGS+=(--zero-stage "${zero}" --deepspeed-config "${ds_config}")
  fi
  if [[ -f "${save_dir}/latest" ]]; then GPT_ARGS+=(--load "${save_dir}"); fi
}
