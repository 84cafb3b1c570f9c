"""Model building: meta/ZeRO-3 construction, weight loading, LoRA injection."""
