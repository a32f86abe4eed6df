"""Plain-Python view-models of the kiosk screens: immutable display state, intent methods, `subscribe`.

Nothing here imports Kivy (an import-linter contract says so): screens in `ui.kiosk` render these states and call
these intents, and the unit tests drive them with a fake clock and fake ports.
"""
