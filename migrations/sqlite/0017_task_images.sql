-- Images in a task (docs/architecture.md, "Images"): the images that go
-- with the goal, as the JSON list submitted ({"url"} or {"media_type",
-- "data"}), checked at submission; NULL for a task without any.
ALTER TABLE tasks ADD COLUMN images TEXT;
