"""The embedded generation engine (backend kind ``local``).

- :mod:`.model_store`: obtain + convert models (``pull``, ``model_path``, ``list_models``).
- :mod:`.runner`: ``ModelRunner`` (forward over a slot KV cache: prefill / decode / crop).
- :mod:`.scheduler`: ``Engine`` (worker thread, continuous batching, shared prefill).
- :mod:`.loader`: ``load_engine`` (model name -> running engine).

Nothing here imports torch at package import time, so the CLI stays fast.
"""
