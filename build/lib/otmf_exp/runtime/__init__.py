"""What a run needs besides the methods: checkpoints, atomic file writes, time and memory measurement."""
