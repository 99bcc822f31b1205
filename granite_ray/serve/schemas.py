"""Request bodies of the HTTP API, as the OpenAI, TEI and Cohere/Jina clients send them.

Unknown fields are ignored (clients send extras such as `user` or Cohere's `rank_fields`); a field
we read is validated strictly: a wrong type, an empty input or a non-string item is a 400 naming the
field. Limits that come from the server's config (inputs per request, top_n) are checked by the API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

LongDocuments = Literal["chunk-mean", "chunk-max"]
PromptName = Literal["query", "document"]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def texts_or_token_ids(value: Any) -> list[str] | list[list[int]]:
    """A string, a list of strings, one list of token ids or a list of them -> a list of inputs."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"expected a string, a list of strings or token ids, got {_kind(value)}")
    if not value:
        raise ValueError("must not be empty")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]  # one input given as token ids
    if isinstance(value[0], list):
        for i, ids in enumerate(value):
            if not isinstance(ids, list):
                raise ValueError(f"item {i}: expected a list of token ids, got {_kind(ids)}")
            if not ids:
                raise ValueError(f"item {i}: empty list of token ids")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                bad = next(t for t in ids if not isinstance(t, int) or isinstance(t, bool))
                raise ValueError(f"item {i}: token ids must be integers, got {_kind(bad)}")
        return value
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise ValueError(f"item {i}: expected a string, got {_kind(text)}")
        if not text:
            raise ValueError(f"item {i}: empty string")
    return value


def document_texts(value: Any) -> list[str]:
    """Rerank documents: strings, or objects with a `text` (Cohere and Jina accept both)."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {_kind(value)}")
    if not value:
        raise ValueError("must not be empty")
    texts = []
    for i, doc in enumerate(value):
        if isinstance(doc, dict) and "text" in doc:
            doc = doc["text"]
        if not isinstance(doc, str):
            raise ValueError(f"item {i}: expected a string or {{\"text\": string}}, got {_kind(doc)}")
        texts.append(doc)
    return texts


Inputs = Annotated[list[str] | list[list[int]], BeforeValidator(texts_or_token_ids)]
Documents = Annotated[list[str], BeforeValidator(document_texts)]
Query = Annotated[str, Field(min_length=1, strict=True)]
Texts = Annotated[list[Annotated[str, Field(strict=True)]], Field(min_length=1)]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LongInputFields(Request):
    """Our extensions for over-long inputs; None follows the server's `long_inputs` policy."""

    truncate: StrictBool | None = Field(None, description="true: keep the first max_length tokens; false: 400")
    long_documents: LongDocuments | None = Field(None, description="embed overlapping windows and pool them")
    prompt_name: PromptName | None = Field(None, description="prepend the model's query or document prompt")


class OpenAIEmbeddingRequest(LongInputFields):
    input: Inputs
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, gt=0, description="Matryoshka: keep the first dimensions (renormalized)")


class TEIEmbedRequest(LongInputFields):
    inputs: Inputs
    normalize: StrictBool = True
    dimensions: StrictInt | None = Field(None, gt=0)


class TEISparseRequest(LongInputFields):
    inputs: Inputs


class RerankRequest(Request):
    """Cohere (v1/v2) and Jina rerank."""

    query: Query
    documents: Documents
    model: str | None = None
    top_n: StrictInt | None = Field(None, gt=0)
    return_documents: StrictBool = False
    truncate: StrictBool | None = None


class TEIRerankRequest(Request):
    query: Query
    texts: Texts
    raw_scores: StrictBool = False
    return_text: StrictBool = False
    truncate: StrictBool | None = None
