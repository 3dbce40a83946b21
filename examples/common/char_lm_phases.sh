# shellcheck shell=bash
# Shared by examples/enwik8/train_*.sh and examples/text8/train_*.sh: the paper's 3-phase character-LM schedule.
#
# Transformer-LS (Appendix C) trains in 3 phases with sequence lengths 2048 / 4096 / 8192, 430k / 50k / 50k
# steps, 10k / 5k / 5k linear warmup steps then a constant learning rate, batch sizes 32 / 32 / 16, and no
# gradient clipping. Each phase here is its own run: phase k > 1 starts from the last checkpoint of phase k-1
# (`--load <phase k-1 dir> --finetune`: weights only, so the warmup and the iteration counter restart, as in a
# new phase), then saves into its own directory. A phase that already has a checkpoint of its own is resumed
# from it instead (`--load <phase k dir>`: weights, optimizer, scheduler, RNG and data position), so re-running
# the script after an interruption continues where it stopped. The position table is sized for the longest
# phase (`--max-position-embeddings 8192`) from the start, so every phase loads the same weights.
#
# The calling script sets: MODEL_ARGS (array), LR, DATA_PREFIX, SPLIT, RUN_NAME. Everything else has a default
# and can be overridden from the environment:
#   PHASES="1 2 3"              which phases to run now
#   CKPT_DIR=checkpoints/$RUN_NAME  where phase<k>/ checkpoint directories go
#   LAUNCHER="torchrun --standalone --nproc-per-node 8"  how to start pretrain_gpt_ls.py (use "python" for one
#                               process)
#   PHASE1_ITERS=430000 PHASE2_ITERS=50000 PHASE3_ITERS=50000        steps per phase
#   PHASE1_WARMUP=10000 PHASE2_WARMUP=5000 PHASE3_WARMUP=5000        warmup steps per phase
#   PHASE1_SEQ=2048 PHASE2_SEQ=4096 PHASE3_SEQ=8192                  sequence length per phase
#   PHASE1_GBS=32 PHASE2_GBS=32 PHASE3_GBS=16                        global batch size per phase
#   MICRO_BATCH=1               per-GPU micro batch (gradient accumulation makes up the global batch);
#                               PHASE<k>_MICRO_BATCH overrides it for one phase
#   PRECISION="--bf16"          or "--fp16" (V100), or "" for fp32
#   PARALLEL_ARGS=""            e.g. "--zero-stage 1" or "--tensor-model-parallel-size 2"
#   SAVE_INTERVAL=5000 EVAL_INTERVAL=5000 EVAL_ITERS=20 LOG_INTERVAL=100
#   TENSORBOARD_DIR=$CKPT_DIR/tensorboard
#   EXTRA_ARGS=""               appended last, so it overrides any flag above (argparse keeps the last value)

run_char_lm_phases() {
  local repo_root
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  : "${RUN_NAME:?RUN_NAME must be set by the calling script}"
  : "${DATA_PREFIX:?set DATA_PREFIX to the dataset prefix written by prepare_*.sh (…_text_document)}"
  : "${LR:?LR must be set by the calling script}"
  : "${SPLIT:=90,5,5}"
  local phases="${PHASES:-1 2 3}"
  local ckpt_dir="${CKPT_DIR:-checkpoints/${RUN_NAME}}"
  local launcher="${LAUNCHER:-torchrun --standalone --nproc-per-node 8}"
  local precision="${PRECISION---bf16}"
  local tb_dir="${TENSORBOARD_DIR:-${ckpt_dir}/tensorboard}"
  local -a iters=("" "${PHASE1_ITERS:-430000}" "${PHASE2_ITERS:-50000}" "${PHASE3_ITERS:-50000}")
  local -a warmup=("" "${PHASE1_WARMUP:-10000}" "${PHASE2_WARMUP:-5000}" "${PHASE3_WARMUP:-5000}")
  local -a seq=("" "${PHASE1_SEQ:-2048}" "${PHASE2_SEQ:-4096}" "${PHASE3_SEQ:-8192}")
  local -a gbs=("" "${PHASE1_GBS:-32}" "${PHASE2_GBS:-32}" "${PHASE3_GBS:-16}")
  local -a mbs=("" "${PHASE1_MICRO_BATCH:-${MICRO_BATCH:-1}}" "${PHASE2_MICRO_BATCH:-${MICRO_BATCH:-1}}"
                "${PHASE3_MICRO_BATCH:-${MICRO_BATCH:-1}}")
  local phase
  for phase in ${phases}; do
    case "${phase}" in 1|2|3) ;; *) echo "PHASES: unknown phase '${phase}' (use 1, 2, 3)" >&2; return 2 ;; esac
    local save="${ckpt_dir}/phase${phase}"
    local -a load_args=()
    if [[ -f "${save}/latest" ]]; then
      load_args=(--load "${save}")                      # resume this phase
    elif (( phase > 1 )); then
      local previous="${ckpt_dir}/phase$((phase - 1))"
      if [[ ! -f "${previous}/latest" ]]; then
        echo "phase ${phase} starts from phase $((phase - 1)), but ${previous}/latest does not exist" >&2
        return 1
      fi
      load_args=(--load "${previous}" --finetune)       # new phase: weights only, fresh schedule
    fi
    local -a cmd=(
      ${launcher} "${repo_root}/pretrain_gpt_ls.py"
      "${MODEL_ARGS[@]}"
      --max-position-embeddings "${MAX_POSITIONS:-8192}"
      --seq-length "${seq[phase]}"
      --micro-batch-size "${mbs[phase]}"
      --global-batch-size "${gbs[phase]}"
      --train-iters "${iters[phase]}"
      --lr "${LR}" --lr-decay-style constant --lr-warmup-iters "${warmup[phase]}"
      --clip-grad 0
      --data-path "${DATA_PREFIX}" --split "${SPLIT}" --tokenizer-type ByteTokenizer
      --save "${save}" --save-interval "${SAVE_INTERVAL:-5000}"
      --eval-interval "${EVAL_INTERVAL:-5000}" --eval-iters "${EVAL_ITERS:-20}"
      --log-interval "${LOG_INTERVAL:-100}"
      --tensorboard-dir "${tb_dir}/phase${phase}"
      ${precision} ${PARALLEL_ARGS:-}
      "${load_args[@]}"
      ${EXTRA_ARGS:-}
    )
    echo "=== ${RUN_NAME}: phase ${phase} (seq ${seq[phase]}, ${iters[phase]} steps, global batch ${gbs[phase]})"
    echo "+ ${cmd[*]}"
    "${cmd[@]}" || return $?
  done
}
