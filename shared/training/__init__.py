"""nnU-Net training through its own planner and trainer: dataset export, recipes, short trainers."""
