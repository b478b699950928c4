-- Call tasks (docs/architecture.md, "Call tasks"): a task that makes one
-- tool call, with no planner or LLM, as `POST /v1/tasks` with `call` and the
-- MCP server's tool calls submit. The call ({"id", "name", "arguments"}) as
-- JSON text; NULL for an agent task.
ALTER TABLE tasks ADD COLUMN tool_call TEXT;
