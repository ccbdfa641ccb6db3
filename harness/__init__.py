"""The real parts as the tests and the benchmarks drive them.

engine   a CPU vLLM server that can be killed and restarted on the same port
flood    a SIGKILLed worker's messages redelivered to a worker that stops meanwhile
launcher what `cohost launch` meets without a GPU: a fake card, a recording vLLM stand-in
mps      a stand-in for the CUDA MPS control daemon's socket
pubsub   a Pub/Sub project on the emulator with the worker's topics, a publisher, a
         collector of results and dead letters, and worker processes against it

Both `tests/` and `bench/` import this; neither imports the other's support code.
"""
