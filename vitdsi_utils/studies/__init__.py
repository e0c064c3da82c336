"""The studies: one module per study, each composing the library into one experiment with its tables and figures."""
