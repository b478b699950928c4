-- Structured output (docs/architecture.md, "Structured output"): a task may
-- ask for an answer that is JSON matching a JSON Schema. Its response format
-- ({"name", "schema", "strict"}); NULL for a task that asks for none. 0014
-- is left for a migration merged from another branch.
ALTER TABLE tasks ADD COLUMN response_format JSON;
