"""Honest fakes for the plugin's tests: they behave like the real thing, on no hardware."""
