"""llmux-sim, the vLLM stand-in that llmuxd's tests and benchmarks run instead of a GPU.

process.py is the `vllm serve` process (arguments, what it holds, its life), server.py
its HTTP surface, client.py its side of the EngineCore child, engine.py that child, tp.py the engine's side of the tensor-parallel workers and
worker.py theirs, cuda.py the (fake or real) CUDA state all three hold, host.py what a
real vLLM process holds that CRIU must cope with. Imports go one way: process -> server, client,
engine, cuda, host; server -> client; engine -> tp -> cuda; worker -> tp, cuda; client imports none of them
(it starts the engine by `python -m llmuxd.sim engine`, tp the workers by `-m`).
Nothing in the daemon imports this package: it is only ever a child process.
"""
