"""npcbus gateway service."""
