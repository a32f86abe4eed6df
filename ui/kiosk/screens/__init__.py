"""One module per screen, each with its .kv beside it (loaded by `KioskApp.screen` on first use)."""
