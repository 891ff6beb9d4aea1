"""`python -m vlm.bench`: this project against the reference implementation, side by side, same run."""
