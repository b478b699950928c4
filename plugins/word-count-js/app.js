// The JavaScript example tool, on the kit in plugins/sdk/js (built by
// scripts/common.sh build_script_plugins with componentize-js).
import { tool, ToolError } from "../sdk/js/opspawn.js";
export { tools } from "../sdk/js/opspawn.js";

tool("word_count_js", "Counts the words in a text that have at least min_length characters.",
  { text: "string", min_length: "integer?" },
  ({ text, min_length = 1 }) => {
    if (min_length < 1) throw new ToolError("invalid_min_length", "min_length must be at least 1");
    return { words: text.split(/\s+/).filter((w) => w.length >= min_length).length };
  });
