-- Step inputs and outputs above a size (LLM transcripts, big tool results)
-- live here, once per distinct content, so the steps table stays narrow.
CREATE TABLE payloads (
    sha256 TEXT PRIMARY KEY NOT NULL,
    body   TEXT NOT NULL
);
ALTER TABLE steps ADD COLUMN input_ref TEXT;
ALTER TABLE steps ADD COLUMN output_ref TEXT;
CREATE INDEX steps_by_input_ref ON steps (input_ref) WHERE input_ref IS NOT NULL;
CREATE INDEX steps_by_output_ref ON steps (output_ref) WHERE output_ref IS NOT NULL;
