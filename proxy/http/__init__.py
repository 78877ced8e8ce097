"""http: see the package docstring of llmproxy."""
