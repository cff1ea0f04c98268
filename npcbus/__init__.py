"""npcbus: LLM-driven game NPCs over RabbitMQ, with LoRA adapters that keep improving."""

__version__ = "0.1.0"
