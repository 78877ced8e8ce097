"""io: see the package docstring of llmproxy."""
