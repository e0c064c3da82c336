"""The study runner: profiles, notebook execution with papermill, stamps, and the study's report."""
