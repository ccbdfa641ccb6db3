"""A chat load replayed from the Azure LLM inference trace 2023 (conversation).

The trace (CC BY 4.0) is from Patel et al., "Splitwise: Efficient generative LLM inference
using phase splitting", ISCA 2024; it lives in ../shared/traces (README.md there).

trace     the trace's requests, its clock scaled to a wanted rate, sizes capped to a context
replay    the requests sent to a chatbot (streaming: TTFT, TPOT), its chat-idle fraction,
          and its capacity
"""
