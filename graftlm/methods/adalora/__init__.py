"""methods/adalora."""
