#!/usr/bin/env bash
# SciFact distillation benchmark (issue 11): round 1 contrastive -> mine negatives with the round-1 model ->
# teacher scores on the mined file -> round 2 with --loss kl, as a mix (w = 0.5) and distillation only
# (w = 1), optionally next to contrastive-only round 2 on the same mined negatives (the baseline).
#
# Usage: bash bench/distill_scifact.sh [RUN_ROOT]     (default runs/scifact-minilm; complete stages are reused)
# Env:
#   TEACHER_TYPE  hybrid (default) | bi | cross.  hybrid: `dr score --teacher_type bi` with TEACHER, then
#                 fused with BM25 per query (bench/hybrid_teacher.py); its own test quality is printed too.
#   TEACHER       teacher model folder (default: the round-1 model, whose corpus and training-query
#                 vectors give the bi-encoder scores directly; any other teacher is run with `dr score`)
#   DISTIL_T      --distil_temperature, the student's (default 0.05, its contrastive temperature)
#   TEACHER_TS    --teacher_temperature values, one round 2 each (default for bi/hybrid teachers: none, i.e. the
#                 teacher's scores are divided by DISTIL_T too; for a cross-encoder's logits: "1", their own
#                 scale, as docs/distill.md recommends); e.g. TEACHER_TS="0.5 1 2"
#   WEIGHTS       --distill_weight values for round 2 (default "0.5 1.0")
#   SEEDS         training seeds for round 2 (default "42")
#   CONTRASTIVE   1 (default) also trains contrastive-only round 2 on the same file; 0 skips it
#   ENCODE_SET    pipeline override for encoding precision (default encode.bf16=auto: bf16 only on CPUs
#                 with native bf16; emulated bf16 is several times slower than float32)
#   R1            a finished round-1 run folder to use instead of training RUN_ROOT/fine-tuned (its model mines
#                 the negatives; e.g. R1=runs/scifact-minilm/fine-tuned-seed43); it is used as it is, never rerun
#   SCORED        a teacher-scored copy of the mined file made elsewhere (e.g. out-of-fold cross-encoder scores from
#                 bench/oof_teacher.sh); used instead of running a teacher (TEACHER is then ignored); it must hold
#                 the same groups as RUN_ROOT/distill/train.mined.jsonl (checked)
#   NPROC         processes for dr score (default 2), DR_DATA (default ../shared/data), PYTHON (default python)
# Takes hours on 2 CPU cores without AVX-512 (each MiniLM training ~35-45 min); less with it.
# Writes RUN_ROOT/distill/distill-summary.txt: nDCG@10 / MRR@10 / R@100 of every run, for bench/RESULTS.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/scifact-minilm}"
data="${DR_DATA:-../shared/data}/scifact"
py="${PYTHON:-python}"
nproc="${NPROC:-2}"
seeds="${SEEDS:-42}"
weights="${WEIGHTS:-0.5 1.0}"
encode_set="${ENCODE_SET:-encode.bf16=auto}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
dr() { "$py" -m dr.cli "$@"; }
step() { echo "+ $*" >&2; "$@"; }
start=$(date +%s)

r1="${R1:-$root/fine-tuned}"
d="$root/distill"
teacher="${TEACHER:-$r1/model}"
teacher_type="${TEACHER_TYPE:-hybrid}"
distil_t="${DISTIL_T:-0.05}"
teacher_ts="${TEACHER_TS:-same}"
[[ "$teacher_type" == cross && -z "${TEACHER_TS:-}" ]] && teacher_ts=1

# 1. Round 1: contrastive on random corpus negatives (configs/scifact/minilm.yaml).
if [[ -n "${R1:-}" ]]; then  # another config's run (e.g. another seed): rerunning minilm.yaml would retrain it
  [[ -f "$r1/metrics.json" && -d "$r1/model" ]] || { echo "R1=$r1: not a finished round-1 run" >&2; exit 2; }
else
  step dr pipeline configs/scifact/minilm.yaml --quiet --set "run_dir=$r1" --set "$encode_set"
fi

# BM25 on the test queries: the lexical reference (and half of the hybrid teacher).
step dr demo bm25 --corpus "$data/corpus.jsonl" --queries "$data/queries.test.tsv" --qrels "$data/qrels.test.trec" \
  --output_dir "$root/bm25" --metrics nDCG@10 MRR@10 R@100

# 2. Rank the corpus for the training queries with the round-1 model; mine negatives from ranks [3, 50).
if [[ ! -f "$r1/train.run.txt" ]]; then
  step dr encode --model_name_or_path "$r1/model" --dataset_name "$data" --dataset_split train \
    --encode_is_qry --q_max_len 64 --encoded_save_path "$r1/embeddings/train_queries"
  step dr search --query_reps "$r1/embeddings/train_queries.arrow" \
    --passage_reps "$r1/embeddings/corpus.*arrow" --depth 100 --save_ranking_to "$r1/train.run.txt"
fi
mkdir -p "$d"
step dr mine --run "$r1/train.run.txt" --queries "$data/queries.train.tsv" --qrels "$data/qrels.train.trec" \
  --corpus "$data/corpus.jsonl" --output "$d/train.mined.jsonl" --ranks 3 50 --n_negatives 15 --seed 42

# 3. Teacher scores on every (query, passage) of the mined file (resumable; ranks write parts). Scores of
#    another teacher must not be reused: the run root records which teacher its scores came from.
teacher_id="$teacher_type:$teacher"
if [[ -n "${SCORED:-}" ]]; then
  teacher_id="scored:$(realpath "$SCORED")" teacher_type=scored
fi
if [[ -f "$d/teacher.id" && "$(cat "$d/teacher.id")" != "$teacher_id" ]]; then
  echo "bench/distill_scifact.sh: $d holds scores of teacher $(cat "$d/teacher.id"), not" \
    "$teacher_id; pass another RUN_ROOT" >&2
  exit 2
fi
echo "$teacher_id" > "$d/teacher.id"
if [[ -n "${SCORED:-}" && ! -f "$d/train.teacher.jsonl" ]]; then
  # Scores made elsewhere must be of these very groups (same queries and passages, in this order).
  "$py" - "$d/train.mined.jsonl" "$SCORED" <<'PY'
import json, sys
def groups(path):
    return [(g["query_id"], [p["docid"] for p in g["positive_passages"] + g["negative_passages"]])
            for g in map(json.loads, filter(str.strip, open(path, encoding="utf-8")))]
if groups(sys.argv[1]) != groups(sys.argv[2]):
    sys.exit(f"SCORED={sys.argv[2]} does not hold the groups of {sys.argv[1]} (queries, passages, order)")
PY
  cp "$SCORED" "$d/train.teacher.jsonl"
fi
score_type="$teacher_type"; [[ "$teacher_type" == hybrid ]] && score_type=bi
score=(-m dr.score.cli --teacher_type "$score_type" --model_name_or_path "$teacher"
  --dataset_name "$d/train.mined.jsonl" --output "$d/train.teacher.jsonl" --batch_size 64)
[[ "$score_type" == bi ]] && score+=(--q_max_len 64 --p_max_len 256)
if [[ ! -f "$d/train.teacher.jsonl" && "$score_type" == bi && "$teacher" == "$r1/model" ]]; then
  # The round-1 model already encoded the corpus (p_max_len 256) and the training queries (q_max_len 64):
  # q.p from those vectors is what `dr score` computes (checked: max difference 9e-8 on 96 pairs), in
  # seconds instead of re-encoding 12.9k pairs (~30-45 min on 2 cores without AVX-512).
  step "$py" -m bench.hybrid_teacher dense --input "$d/train.mined.jsonl" \
    --query_reps "$r1/embeddings/train_queries.arrow" --passage_reps "$r1/embeddings/corpus.*arrow" \
    --output "$d/train.teacher.jsonl"
fi
if [[ ! -f "$d/train.teacher.jsonl" ]]; then
  if [[ "$nproc" -gt 1 ]]; then
    step "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" "${score[@]}"
  else
    step "$py" "${score[@]}"
  fi
fi
teacher_label="$teacher_id (T=$distil_t)"
if [[ "$teacher_type" == hybrid ]]; then
  step "$py" -m bench.hybrid_teacher train --scored "$d/train.teacher.jsonl" --corpus "$data/corpus.jsonl" \
    --output "$d/train.scored.jsonl"
  # The teacher's own quality on the test queries: the round-1 test run fused with BM25 the same way.
  step "$py" -m bench.hybrid_teacher run --run "$r1/run.tevatron.txt" --queries "$data/queries.test.tsv" \
    --corpus "$data/corpus.jsonl" --qrels "$data/qrels.test.trec" --output "$d/teacher.test.trec" \
    > "$d/teacher-metrics.json"
else
  cp "$d/train.teacher.jsonl" "$d/train.scored.jsonl"
fi

# 4. Round 2 on the scored file: contrastive only (baseline) and KL at each weight; same steps and seeds.
export DR_DISTILL_TRAIN="$d/train.scored.jsonl" DR_DISTIL_TEMPERATURE="$distil_t"
runs=()
for seed in $seeds; do
  if [[ "${CONTRASTIVE:-1}" == 1 ]]; then
    step dr pipeline configs/scifact/minilm-round2.yaml --quiet --set "run_dir=$d/contrastive-s$seed" \
      --set "train.dataset_name=$d/train.scored.jsonl" --set "train.seed=$seed" --set "$encode_set"
    runs+=("contrastive-s$seed")
  fi
  for w in $weights; do
    for tt in $teacher_ts; do
      name="kl-w$w-t$distil_t-s$seed" teacher_t=()
      if [[ "$tt" != same ]]; then
        name="kl-w$w-t$distil_t-tt$tt-s$seed" teacher_t=(--set "train.teacher_temperature=$tt")
      fi
      DR_DISTILL_WEIGHT="$w" step dr pipeline configs/scifact/minilm-distill.yaml --quiet \
        --set "run_dir=$d/$name" --set "train.seed=$seed" --set "$encode_set" "${teacher_t[@]}"
      runs+=("$name")  # named by weight, temperatures and seed: no run reused for another
    done
  done
done

R1_METRICS="$r1/metrics.json" "$py" - "$d" "$teacher_label" "$(($(date +%s) - start))" "${runs[@]}" <<'PY' | tee "$d/distill-summary.txt"
import json, os, sys
folder, teacher, seconds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
metrics = ["nDCG@10", "MRR@10", "R@100"]
print(f"SciFact test (300 queries); teacher {teacher}")
print(f"{'run':<28}" + "".join(f"{m:>9}" for m in metrics))
rows = [("BM25 (bm25s)", "../bm25/metrics.json"), ("round 1 (contrastive)", os.path.abspath(os.environ["R1_METRICS"])),
        ("teacher (hybrid)", "teacher-metrics.json")] + [(run, f"{run}/metrics.json") for run in runs]
for label, path in rows:
    if os.path.isfile(os.path.join(folder, path)):
        values = json.load(open(os.path.join(folder, path)))
        print(f"{label:<28}" + "".join(f"{values[m]:>9.4f}" for m in metrics))
print(f"wall time of this invocation: {seconds} s")
PY
