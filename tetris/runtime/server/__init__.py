"""The OpenAI-compatible HTTP daemon in front of the engine: `app.create_app(engine, metrics)`."""
