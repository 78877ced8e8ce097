"""runtime: see the package docstring of llmproxy."""
