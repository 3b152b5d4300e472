"""Adapters to other forms: merged folders, GGUF adapter and merged files for llama.cpp."""
