"""`graftlm serve`: the OpenAI-compatible app, wire format, scheduler and adapter pool."""
