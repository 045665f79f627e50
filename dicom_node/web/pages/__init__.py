"""The reading room's routes, one module per page; each module's ``routes(w)`` lists them."""
