"""hwnas' Hydra config tree, shipped inside the package and read with importlib.resources."""
