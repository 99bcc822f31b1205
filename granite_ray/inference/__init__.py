"""What evaluation, mining and serving run: the encoder, the cross-encoder reranker, vLLM actors. No training code."""
