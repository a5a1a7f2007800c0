from llmuxd.cli import main

main()
