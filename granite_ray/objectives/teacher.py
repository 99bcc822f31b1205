"""The teacher (R2 section 3.3; Wang et al. 2024, arXiv:2401.00368): a decoder LLM trained as an embedder.

Inputs as the contrastive stage's: framed token ids of each row's query (with the task instruction
as its prompt), positive and hard negatives, every text ending with EOS (the tokenizer is made to
append it), embedded by the last layer's vector at that EOS and trained with GTE's loss, in-batch
negatives gathered across workers. With `lora`, only peft's adapters train; the artifact is the
plain HF checkpoint with the adapters folded in, which vLLM's pooling runner and
sentence-transformers load.
"""

from __future__ import annotations

import torch

from granite_ray.config import TrainTeacherConfig
from granite_ray.models.modernbert import sentence_transformers_files, write_artifact
from granite_ray.objectives.retriever import ContrastiveObjective, load_encoder
from granite_ray.tokenizer import with_eos


class TeacherObjective(ContrastiveObjective):
    config: TrainTeacherConfig
    prepare_tokenizer = staticmethod(with_eos)  # the decoder pools EOS: every text must end with it

    def __init__(self, config: TrainTeacherConfig, tokenizer) -> None:
        super().__init__(config, self.prepare_tokenizer(tokenizer))

    def build_model(self) -> torch.nn.Module:
        model, _ = load_encoder(self.config)  # AutoModel of a causal LM: the decoder without its LM head
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.config.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = self.config.lora
            model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules))
        self.pooling = "lasttoken"
        self.layer_types = None  # decoders take no per-layer-type masks: the varlen lengths keep segments apart
        prompt = self.config.data.query_prompt
        # The model's own context, not the training length: vLLM refuses a longer max_model_len than this says.
        self.module_files = sentence_transformers_files(model.config.hidden_size, model.config.max_position_embeddings,
                                                        pooling="lasttoken", prompts={"query": prompt} if prompt else None)
        return model

    def save_artifact(self, model: torch.nn.Module, uri: str, extra_files: dict[str, bytes]) -> None:
        if self.config.lora is not None:
            model = model.merge_and_unload()
        write_artifact(model, self.tokenizer, self.config, uri, {**self.module_files, **extra_files})
