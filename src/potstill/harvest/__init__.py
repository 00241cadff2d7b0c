"""Black-box distillation data: harvest an OpenAI-compatible endpoint, store, export, train.

* :mod:`.prompts` -- potstill's default prompt set and prompt-file reading;
* :mod:`.store` -- the crash-safe SQLite (WAL) record store;
* :mod:`.client` -- the asyncio harvester (bounded concurrency, retries, exactly once);
* :mod:`.export` -- store -> ``messages`` JSONL/Parquet;
* :mod:`.dataset` -- harvested conversations -> training blocks, assistant-only labels and
  top-k logprob targets for :func:`potstill.train.data.prepare_data`.

Nothing heavy is imported here: import the submodule you need.
"""
