"""mteb 2.x over our encoder: the EncoderProtocol adapter, and BEIR folders as mteb retrieval tasks."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType

from granite_ray.config import EncoderConfig
from granite_ray.evaluate.beir import BeirDataset, read_jsonl
from granite_ray.inference.encoder import Encoder


class MtebEncoder(AbsEncoder):
    """mteb's encoder protocol: query/document prompts from the model folder or config."""

    def __init__(self, model_uri: str, config: EncoderConfig | None = None) -> None:
        self.model = Encoder(model_uri, config)
        name = model_uri.rstrip("/").rsplit("/", 1)[-1]
        similarity = ScoringFunction.COSINE if self.model.similarity == "cosine" else ScoringFunction.DOT_PRODUCT
        self.mteb_model_meta = ModelMeta.create_empty({"name": f"granite-ray/{name}", "similarity_fn_name": similarity})

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        if prompt_type == PromptType.query:
            return self.model.encode_queries(texts)
        return self.model.encode_documents(texts)


def beir_task(dataset: BeirDataset) -> AbsTaskRetrieval:
    """An mteb retrieval task reading a BEIR folder (local or s3://) instead of the hub."""

    class BeirFolderTask(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=dataset.name, description=f"BEIR folder {dataset.uri}", reference=None,
            dataset={"path": dataset.uri, "revision": "local"}, type="Retrieval", category="t2t",
            eval_splits=[dataset.split], eval_langs=["eng-Latn"], main_score="ndcg_at_10",
        )

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            rows = read_jsonl(dataset.corpus_uri, "corpus")
            corpus = Dataset.from_list([{"id": str(r["_id"]), "title": r.get("title") or "", "text": r.get("text") or ""}
                                        for r in rows])
            queries = Dataset.from_list([{"id": q, "text": t} for q, t in dataset.queries.items()])
            self.dataset = {"default": {dataset.split: RetrievalSplitData(
                corpus=corpus, queries=queries, relevant_docs=dataset.qrels, top_ranked=None)}}
            self.data_loaded = True

    return BeirFolderTask()


def hub_tasks(names: list[str]) -> list:
    if not names:
        return []
    import mteb

    return list(mteb.get_tasks(tasks=names))
