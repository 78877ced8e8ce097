"""python -m proxy: the llmproxy command line."""

from llmproxy.runtime.cli import main

main()
