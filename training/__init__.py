"""Offline tooling that runs from a checkout (training, benchmarks): it may import ``archon_server``;
the serving package never imports it."""
