"""The service: settings, the aiohttp app factory, the CLI, and (next issues) live sessions."""
