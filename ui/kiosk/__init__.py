"""The Kivy kiosk: the App, its theme, thin screens (one .kv beside each class) over `ui.viewmodels`.

Only this package imports Kivy. Call `ui.kiosk.env.prepare()` before the first Kivy import (the App module does).
"""
