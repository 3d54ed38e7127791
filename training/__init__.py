"""Training scripts (accelerate + diffusers) that produce the files the nodes load."""
