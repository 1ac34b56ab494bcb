"""Running a DVT: the runtime contract, build, the early-exit loop, exit policy, operating points, streaming, evaluation."""
