"""Task logic behind the thin CLIs: each task is callable with a settings object (the parsed
flags), so another task or pipeline calls the library, never a script."""
