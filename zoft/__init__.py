"""zoft: fine-tune Hugging Face language models when GPU memory is the constraint."""

__version__ = "0.1.0"
