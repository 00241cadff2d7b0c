"""``potstill serve``: an OpenAI-compatible HTTP server with continuous batching.

Submodules: :mod:`.engine` (model + batching worker), :mod:`.sampling` (sampler pieces),
:mod:`.app` (FastAPI ``create_app(engine, settings)``), :mod:`.protocol`, :mod:`.auth`,
:mod:`.audit`, :mod:`.background`, :mod:`.cli`. Nothing heavy is imported here.
"""
