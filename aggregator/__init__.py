"""npcbus aggregator service."""
