"""llmux-sim, the vLLM stand-in that llmuxd's tests and benchmarks run instead of a GPU.

server.py is the API server (`vllm serve`), engine.py the EngineCore child, worker.py the
tensor-parallel workers, host.py what a real vLLM process holds that CRIU must cope with.
Nothing in the daemon imports this package: it is only ever a child process.
"""
