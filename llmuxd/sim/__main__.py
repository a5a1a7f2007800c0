from llmuxd.sim.server import main

main()
