#!/usr/bin/env bash
# Submit train -> encode (array) + encode queries -> search -> eval as one SLURM dependency chain.
#
#   bash slurm/submit_all.sh RUN_DIR
#
# Inputs (environment):
#   TRAIN_CONFIG   dr train --config file (YAML/JSON of flag -> value); empty: skip training and
#                  encode MODEL zero-shot
#   MODEL          model for zero-shot runs (default: RUN_DIR/model, i.e. the trained one)
#   CORPUS         passages for dr encode (--dataset_name)
#   QUERIES        queries for dr encode --encode_is_qry (--dataset_name)
#   QRELS          qrels for dr eval
#   SHARDS         corpus shards = array tasks (default 20)
#   ENCODE_ARGS    extra dr encode flags, e.g. "--fp16 --per_device_eval_batch_size 156 --p_max_len 128"
#   QUERY_ARGS     extra flags for the query encode, e.g. "--q_max_len 32"
#   SEARCH_ARGS    extra dr search flags (default "--depth 100 --batch_size -1")
#   SBATCH_ARGS    the site's sbatch options for every job, e.g. "--account=X --partition=Y --time=04:00:00"
#   TRAIN_SBATCH_ARGS, ENCODE_SBATCH_ARGS, SEARCH_SBATCH_ARGS, EVAL_SBATCH_ARGS
#                  sbatch options of one stage, after SBATCH_ARGS (the later option wins), e.g.
#                  TRAIN_SBATCH_ARGS="--nodes=4 --gres=gpu:8 --cpus-per-task=32"; both override the
#                  #SBATCH lines of the scripts
#   SRUN_ARGS      extra srun options inside every job (see common.sh)
#   STAGES         which stages to submit, in order (default "train encode search eval"; train only with
#                  TRAIN_CONFIG), e.g. "search eval" after resubmitting a failed encode task
#   AFTER          job ids (a:b:...) the first submitted stage waits for (afterok), e.g. that resubmission
# Prints the job ids; every job starts only when the ones it needs succeeded (afterok).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ $# -ne 1 ]]; then
  echo "usage: $0 RUN_DIR   (inputs from the environment, see the header)" >&2
  exit 2
fi
run_dir="$1"
: "${CORPUS:?set CORPUS}" "${QUERIES:?set QUERIES}" "${QRELS:?set QRELS}"
shards="${SHARDS:-20}"
model="${MODEL:-$run_dir/model}"
read -r -a encode_args <<<"${ENCODE_ARGS:-}"
read -r -a query_args <<<"${QUERY_ARGS:-}"
read -r -a search_args <<<"${SEARCH_ARGS:---depth 100 --batch_size -1}"
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
stages=" ${STAGES:-train encode search eval} "
for stage in $stages; do
  case "$stage" in
    train | encode | search | eval) ;;
    *) echo "$0: unknown stage '$stage' in STAGES (train encode search eval)" >&2; exit 2 ;;
  esac
done
mkdir -p "$run_dir/embeddings"
export DR_SLURM_DIR="$here"

submit() {  # submit STAGE [sbatch options] SCRIPT [flags]: print the command, echo the job id
  local stage_args=() var
  var="$(tr '[:lower:]' '[:upper:]' <<<"$1")_SBATCH_ARGS"
  read -r -a stage_args <<<"${!var:-}"
  shift
  printf '+ sbatch --parsable' >&2
  printf ' %q' "${sbatch_args[@]}" "${stage_args[@]}" "$@" >&2
  printf '\n' >&2
  sbatch --parsable "${sbatch_args[@]}" "${stage_args[@]}" "$@" | cut -d';' -f1
}

after="${AFTER:-}"  # afterok job ids of the next stage, a:b:...
depends() { if [[ -n "$after" ]]; then echo "--dependency=afterok:$after"; fi; }
if [[ -n "${TRAIN_CONFIG:-}" ]]; then
  model="$run_dir/model"
  if [[ "$stages" == *" train "* ]]; then
    mapfile -t dep < <(depends)
    train_job=$(submit train "${dep[@]}" "$here/train.sbatch" --config "$TRAIN_CONFIG" --output_dir "$model")
    echo "train:          $train_job"
    after="$train_job"
  fi
fi
if [[ "$stages" == *" encode "* ]]; then
  mapfile -t dep < <(depends)
  # --encode_num_shard: the task id is the shard index, so `sbatch --array=K` can redo one task.
  corpus_job=$(submit encode "${dep[@]}" --array="0-$((shards - 1))" "$here/encode.sbatch" \
    --model_name_or_path "$model" --dataset_name "$CORPUS" --encoded_save_path "$run_dir/embeddings/corpus" \
    --encode_num_shard "$shards" "${encode_args[@]}")
  echo "encode corpus:  $corpus_job (array of $shards)"
  query_job=$(submit encode "${dep[@]}" "$here/encode.sbatch" --model_name_or_path "$model" \
    --dataset_name "$QUERIES" --encode_is_qry --encoded_save_path "$run_dir/embeddings/queries" \
    "${encode_args[@]}" "${query_args[@]}")
  echo "encode queries: $query_job"
  after="$corpus_job:$query_job"
fi
if [[ "$stages" == *" search "* ]]; then
  mapfile -t dep < <(depends)
  search_job=$(submit search "${dep[@]}" "$here/search.sbatch" \
    --query_reps "$run_dir/embeddings/queries*.arrow" --passage_reps "$run_dir/embeddings/corpus.*.arrow" \
    --save_ranking_to "$run_dir/rank.txt" "${search_args[@]}")
  echo "search:         $search_job"
  after="$search_job"
fi
if [[ "$stages" == *" eval "* ]]; then
  mapfile -t dep < <(depends)
  eval_job=$(submit eval "${dep[@]}" "$here/eval.sbatch" \
    --qrels "$QRELS" --run "$run_dir/rank.txt" --output "$run_dir/metrics.json")
  echo "eval:           $eval_job"
fi
