def f(event):
    """Greet the `name` in the event, or the world."""
    name = "world"
    if isinstance(event, dict):
        name = event.get("name", name)
    return f"hello, {name}"
