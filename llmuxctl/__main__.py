from llmuxctl.cli import main

main()
