"""Result tables, figures and the paper's numbers."""
