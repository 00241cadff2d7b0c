"""Harvesting: the asyncio client for any OpenAI-compatible endpoint (bounded concurrency,
retries, exactly once) and the ``harvest`` verb.

What it writes is shared with the rest of potstill and lives in the core:
:mod:`potstill.core.store` (the crash-safe SQLite (WAL) record store),
:mod:`potstill.core.messages` (store -> ``messages`` JSONL/Parquet) and
:mod:`potstill.core.prompts` (the default prompt set, prompt files). Training on a harvest
is :mod:`potstill.distill.data.chat`.

Nothing heavy is imported here: import the submodule you need.
"""
