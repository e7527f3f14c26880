"""Data: sources, the chat renderer, our own texts, and the benign task domains."""
