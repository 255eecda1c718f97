"""gen-repo: turn a Hugging Face LLM checkpoint into a ready-to-serve Triton model repository."""

__version__ = "0.1.0"
