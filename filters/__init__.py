"""Builtin llmproxy filters, registered through the llmproxy.filters entry-point group."""
