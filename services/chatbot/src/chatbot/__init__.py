"""The chatbot service: engine settings and an OpenAI-client chat command."""
