"""Per-stage pure step functions (SFT, reward model, PPO...) and their short training loops."""
