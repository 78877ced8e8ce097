"""engine: see the package docstring of llmproxy."""
