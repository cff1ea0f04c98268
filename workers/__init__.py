"""npcbus workers service."""
