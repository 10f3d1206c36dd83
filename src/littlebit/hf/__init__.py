"""The Hugging Face side: the checkpoint format, its digests, the transformers quantizer, loading
the model to compress, and checkpoint reports."""
