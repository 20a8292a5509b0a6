"""Test helpers shipped with the package: a scripted OpenAI-compatible upstream and a server runner.

Used by the tests, the benchmark scripts and fault-injection runs; never by the serving path.
"""
