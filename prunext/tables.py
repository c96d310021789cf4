"""Plain-text tables the commands print (settings, summaries)."""


def format_table(rows: list[tuple[str, object]]) -> str:
    """Two aligned columns, one ``name  value`` pair a line."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
