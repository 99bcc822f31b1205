"""Ray Serve: trained embedders, rerankers and sparse encoders behind OpenAI-, TEI- and Cohere/Jina-compatible HTTP.

`deployments` loads the models in replicas and batches requests by tokens (`batching`); `api` is the
FastAPI ingress (validation, errors, auth); `app` assembles the Serve application and runs it.
"""
