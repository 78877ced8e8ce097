"""The metering filter: token usage per exchange (the lead writes the filter; see tokenizer.py)."""
