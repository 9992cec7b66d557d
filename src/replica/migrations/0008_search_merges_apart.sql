-- The full-text index no longer merges its segments inside the commit that fills it (FTS5's
-- automerge runs in whichever commit crosses a threshold, and was the durable send's tail): the
-- desk merges them a bounded step at a time between sends (`Replica::tidy_search`). FTS5's crisis
-- merge, which still runs inside a commit, waits for 64 segments on a level instead of 16.
INSERT INTO search (search, rank) VALUES ('automerge', 0);
INSERT INTO search (search, rank) VALUES ('crisismerge', 64);
