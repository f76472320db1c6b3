"""Ray actors: thin shells around the plain classes defined beside them."""
