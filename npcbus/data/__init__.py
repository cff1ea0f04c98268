"""Data tools: building cleaned text mixes, NPC dialogue sets, token blocks for training tasks.

Modules (each CLI module keeps its top-level imports light):

- :mod:`npcbus.data.text`: cleaning, language identification and quality heuristics (pure functions).
- :mod:`npcbus.data.sources`: streaming readers for local text folders, JSONL files, data sets saved
  with ``datasets`` and Hugging Face hub data sets (with a fast, clear failure when the hub is
  unreachable).
- :mod:`npcbus.data.dedup`: exact and MinHash LSH near-duplicate removal with bounded memory.
- :mod:`npcbus.data.build`: ``npcbus data build``, the weighted, streaming mix.
- :mod:`npcbus.data.npc`: ``npcbus data npc``, NPC dialogue validation, deduplication and splits.
- :mod:`npcbus.data.blocks`: ``npcbus data blocks``, tokenized fixed-length blocks for tasks.
- :mod:`npcbus.data.lossplot`: a dependency-free PNG line plot (loss across adapter versions).
"""
