"""python -m proxy: the llmproxy command line."""

from .cli import main

main()
