"""Every patch of, or reliance on a private name of, an upstream library: one module per library."""
