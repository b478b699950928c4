# The Python example tool, on the kit in plugins/sdk/python (built by
# scripts/common.sh build_script_plugins with componentize-py).
from opspawn_tool import Tools, ToolError, tool  # importing Tools exports the tools


@tool
def word_count_python(text: str, min_length: int = 1) -> dict:
    """Counts the words in a text that have at least `min_length` characters."""
    if min_length < 1:
        raise ToolError("invalid_min_length", "min_length must be at least 1")
    return {"words": len([w for w in text.split() if len(w) >= min_length])}
