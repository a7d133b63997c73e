"""qwen-magic: chat with a local Qwen model from IPython and Jupyter, served by vLLM."""

__version__ = "0.1.0"
