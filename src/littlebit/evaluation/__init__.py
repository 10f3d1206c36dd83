"""Evaluation data (local folders or the Hugging Face hub) and perplexity as the paper measures it."""
