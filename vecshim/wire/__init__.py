"""Request parsing and reply shapes, one module per protocol."""
