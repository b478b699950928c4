-- Budgets (docs/architecture.md, "Budgets"). Money is whole nano-dollars
-- (10^-9 USD), so sums are exact on both engines.

-- What a task has cost so far; NULL when some of its usage was of a model
-- with no price (and for tasks from before prices were kept): unknown.
ALTER TABLE tasks ADD COLUMN cost_nanos BIGINT;
-- The task's own caps, from `budget` when it was submitted.
ALTER TABLE tasks ADD COLUMN budget_max_tokens BIGINT;
ALTER TABLE tasks ADD COLUMN budget_max_cost_nanos BIGINT;

-- What each tenant with a budget spent in each period (`day:2026-12-02`,
-- `month:2026-12`, UTC), added to in the same write that journals an LLM
-- step's end. Only tenants with a configured budget have rows.
CREATE TABLE tenant_usage (
    tenant        TEXT NOT NULL,
    period        TEXT NOT NULL,
    input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    -- NULL once a call of a model with no price was counted: unknown.
    cost_nanos    BIGINT DEFAULT 0,
    PRIMARY KEY (tenant, period)
);
