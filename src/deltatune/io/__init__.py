"""Files: the native format (delta.json + delta.safetensors) and PEFT adapter directories."""
