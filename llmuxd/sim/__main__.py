from llmuxd.sim.process import main

main()
