-- The plugin versions behind each step, by SHA-256 of their components:
-- the plugin that ran it and the planner that chose it. A task resumed
-- after a restart asks for these versions again.
ALTER TABLE steps ADD COLUMN plugin_sha256 TEXT;
ALTER TABLE steps ADD COLUMN planner_sha256 TEXT;
