"""The method contract and what every method shares: folder I/O, module facts, wrappers."""
