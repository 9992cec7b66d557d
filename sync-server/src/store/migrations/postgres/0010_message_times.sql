-- When the relay received each message an agent's change added, beside the `at` its author gave
-- it (the judge allows at most five minutes ahead of the relay's clock, any time behind).
CREATE TABLE message_times (
    doc_id      TEXT   NOT NULL,
    message_id  TEXT   NOT NULL,
    at          BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (doc_id, message_id)
);
