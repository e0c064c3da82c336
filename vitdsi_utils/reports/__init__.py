"""Result tables, figures, the paper's numbers and the project's target checks."""
