"""The passes the stages share: batching, usage counting, the KL engine, sequential onloading, data
parallelism, resuming, and calibrating the baselines' knobs."""
