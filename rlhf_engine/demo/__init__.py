"""The embedded default task: byte tokenizer, tiny Llama, templated story prompts (see ``task.py``)."""
