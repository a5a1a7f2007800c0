"""llmuxctl: the command-line client of llmuxd's control socket."""
