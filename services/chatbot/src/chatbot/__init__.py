"""The chatbot: a vLLM server speaking the OpenAI API, and what its clients need.

The server is this service's container (services/chatbot/Dockerfile: vLLM plus `cohost
launch chatbot`), started with the plan's CHATBOT_ENGINE_* settings. This package holds
the client side: CHATBOT_* settings and the `chatbot` chat command.
"""
