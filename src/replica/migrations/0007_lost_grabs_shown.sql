-- When the Notifications panel first showed a grab this agent lost ("Taken by another
-- representative"): the entry leaves the panel a minute later.
CREATE TABLE lost_grabs_shown (
    conversation_id TEXT PRIMARY KEY,
    shown_at        INTEGER NOT NULL
) WITHOUT ROWID;
