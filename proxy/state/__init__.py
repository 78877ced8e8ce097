"""state: see the package docstring of llmproxy."""
