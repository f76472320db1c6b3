"""The HTTP routes, one module per tag: each parses, calls one Service
method (its operation id is the method's name) and renders."""
