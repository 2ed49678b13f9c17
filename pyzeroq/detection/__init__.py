"""Task-specific zero-shot QAT for object detection (placeholder, filled below)."""
