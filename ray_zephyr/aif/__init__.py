"""AI feedback: completions from several models, rated by a teacher, binarized into preference pairs (UltraFeedback)."""
